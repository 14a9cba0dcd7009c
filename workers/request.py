"""A request inside the engine: its state machine, sampling parameters, SLO and counters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.length_distribution import LengthDistribution


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"        # waiting again after losing its KV blocks; recomputes on resume
    FINISHED_STOPPED = "stop"      # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"     # max_tokens or the context window
    FINISHED_ABORTED = "abort"     # the client went away, a deadline passed, or the worker drained
    FINISHED_REFUSED = "refused"   # triage: sheddable, and it can no longer meet its SLO; never started

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self in _FINISHED else None


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                       RequestStatus.FINISHED_REFUSED})


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class SloTarget:
    slo_class: str = ""
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    e2e_s: float = 0.0
    sheddable: bool = False


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    priority: int = 0                          # higher is more important
    slo: SloTarget = field(default_factory=SloTarget)
    tenant: str = ""
    eos_token_id: int | None = None
    predicted_output_len: float | None = None  # median of the predicted distribution, when known
    #: the predicted output-length distribution: lengths at the predictor's quantiles (0.1, 0.5, 0.9), or empty
    predicted_lengths: tuple[float, ...] = ()
    #: seconds the request spent before this engine saw it (gateway, balancer queue, routing): its SLO clock
    #: started that much before ``arrival_time``
    upstream_s: float = 0.0

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0               # tokens whose KV is in the cache
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    preemption_times: list[float] = field(default_factory=list)
    num_tokens: int = 0                        # prompt plus output; kept as a counter, it is read every step
    block_hashes: list[int] = field(default_factory=list, repr=False)   # prefix-cache keys of its full blocks
    _length_distribution: LengthDistribution | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.num_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.num_tokens += 1

    @property
    def length_distribution(self) -> LengthDistribution:
        """The predicted output length as a distribution, capped by ``max_tokens`` (uniform when unpredicted)."""
        if self._length_distribution is None:
            lengths = self.predicted_lengths or ((self.predicted_output_len,) * 3 if self.predicted_output_len else ())
            self._length_distribution = LengthDistribution.from_quantiles(lengths, self.sampling.max_tokens)
        return self._length_distribution

    @property
    def slo_start(self) -> float:
        """When the request's SLO clock started, on the engine's clock (the client's arrival, not the engine's)."""
        return self.arrival_time - self.upstream_s

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of prompt then output, sliced from each as they fall: concatenating the two
        copied the whole context on every decode step."""
        prompt = self.prompt_token_ids
        n = len(prompt)
        if end <= n:
            return list(prompt[start:end])
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return list(prompt[start:]) + self.output_token_ids[:end - n]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished
