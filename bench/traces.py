"""Trace loaders. Azure LLM inference traces (2023) carry arrival times; rows become ``TraceRequest``s.

Errors name the file and the line, since a user's own trace is the likeliest input to be malformed.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# ../shared/traces beside the checkout, unless TANDEM_TRACES_DIR says otherwise
SHARED_TRACES = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
AZURE_FILES = {"conv": "azure2023_AzureLLMInferenceTrace_conv.csv", "code": "azure2023_AzureLLMInferenceTrace_code.csv"}


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float          # seconds since the trace's first request
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()   # ids of the prompt's blocks (prefix-sharing traces); equal ids, equal blocks


def default_trace_path(name: str) -> Path:
    if name not in AZURE_FILES:
        raise TraceError(f"unknown trace {name!r}; known: {', '.join(AZURE_FILES)}")
    return Path(os.environ.get("TANDEM_TRACES_DIR") or SHARED_TRACES) / AZURE_FILES[name]


def _parse_time(text: str) -> float:
    """``2023-11-16 18:17:03.9799600`` (100-ns digits, no zone) as POSIX seconds, digits beyond 6 kept."""
    base, _, frac = text.strip().partition(".")
    seconds = datetime.strptime(base, "%Y-%m-%d %H:%M:%S").timestamp()
    return seconds + (float("0." + frac) if frac else 0.0)


def load_azure(path: str | Path, *, start_s: float = 0.0, duration_s: float | None = None,
               limit: int | None = None) -> list[TraceRequest]:
    """Rows of an Azure trace whose arrival lies in [start_s, start_s + duration_s), re-based to start at 0."""
    path = Path(path)
    try:
        handle = path.open(newline="")
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    out: list[TraceRequest] = []
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise TraceError(f"{path}: expected header TIMESTAMP,ContextTokens,GeneratedTokens, got {header}")
        t0: float | None = None
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 3:
                raise TraceError(f"{path}:{line_no}: expected 3 fields, got {len(row)}")
            try:
                t = _parse_time(row[0])
                n_in, n_out = int(row[1]), int(row[2])
            except ValueError as e:
                raise TraceError(f"{path}:{line_no}: {e}") from None
            if n_in < 0 or n_out < 0:
                raise TraceError(f"{path}:{line_no}: token counts must be >= 0")
            t0 = t if t0 is None else t0
            rel = t - t0
            if rel < start_s:
                continue
            if duration_s is not None and rel >= start_s + duration_s:
                break
            out.append(TraceRequest(rel - start_s, n_in, n_out))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise TraceError(f"{path}: no requests in the chosen window")
    return out


SHAREGPT_FILE = "lengths_sharegpt_8k_filtered_stats_llama2_tokenizer.csv"


def load_sharegpt_lengths(path: str | Path | None = None) -> list[tuple[int, int]]:
    """(input, output) token-count pairs of ShareGPT chats; no arrival times (pair them with a process)."""
    path = Path(path) if path else Path(os.environ.get("TANDEM_TRACES_DIR") or SHARED_TRACES) / SHAREGPT_FILE
    try:
        handle = path.open(newline="")
    except OSError as e:
        raise TraceError(f"cannot read lengths file {path}: {e.strerror}") from None
    pairs: list[tuple[int, int]] = []
    with handle:
        reader = csv.DictReader(handle)
        missing = {"num_prefill_tokens", "num_decode_tokens"} - set(reader.fieldnames or ())
        if missing:
            raise TraceError(f"{path}: missing columns {sorted(missing)}")
        for line_no, row in enumerate(reader, start=2):
            try:
                n_in, n_out = int(row["num_prefill_tokens"]), int(row["num_decode_tokens"])
            except (TypeError, ValueError) as e:
                raise TraceError(f"{path}:{line_no}: {e}") from None
            if n_in <= 0 or n_out <= 0:
                raise TraceError(f"{path}:{line_no}: token counts must be positive")
            pairs.append((n_in, n_out))
    if not pairs:
        raise TraceError(f"{path}: no rows")
    return pairs
