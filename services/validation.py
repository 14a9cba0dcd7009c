"""Request checks shared by the gateway and the workers; each failure names the offending field."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Invalid(Exception):
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


def check_sampling(*, max_tokens: int | None, temperature: float | None, top_p: float | None, top_k: int,
                   stop: list[str] | tuple[str, ...], max_stop_strings: int = 8) -> None:
    if max_tokens is not None and max_tokens <= 0:
        raise Invalid("max_tokens", f"must be positive, got {max_tokens}")
    if temperature is not None and (math.isnan(temperature) or math.isinf(temperature) or temperature < 0):
        raise Invalid("temperature", f"must be a finite number >= 0, got {temperature}")
    if top_p is not None and (math.isnan(top_p) or not 0 < top_p <= 1):
        raise Invalid("top_p", f"must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise Invalid("top_k", f"must be >= 0 (0 disables it), got {top_k}")
    if len(stop) > max_stop_strings:
        raise Invalid("stop", f"at most {max_stop_strings} stop strings, got {len(stop)}")


def check_prompt_text(prompt: str, max_bytes: int) -> None:
    if not prompt.strip():
        raise Invalid("prompt", "must not be empty")
    size = len(prompt.encode())
    if size > max_bytes:
        raise Invalid("prompt", f"is {size} bytes, over the {max_bytes}-byte limit")


def check_lengths(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """The model's limits: what only a worker that tokenized the prompt can tell."""
    if max_tokens > max_model_len:
        raise Invalid("max_tokens", f"{max_tokens} is above the model's limit of {max_model_len} tokens")
    if prompt_tokens >= max_model_len:
        raise Invalid("prompt", f"is {prompt_tokens} tokens, longer than the context window of {max_model_len}")
    if prompt_tokens + max_tokens > max_model_len:
        raise Invalid("max_tokens", f"{max_tokens} plus the prompt's {prompt_tokens} tokens exceed the context "
                                    f"window of {max_model_len}")


def check_slo_target(field: str, value: float | None) -> None:
    """A request's own SLO target in ms: finite and >= 0 (0 or unset keeps its class's)."""
    if value is not None and (math.isnan(value) or math.isinf(value) or value < 0):
        raise Invalid(field, f"must be a finite number of milliseconds >= 0 (0: the class's target), got {value}")
