"""Result tables for the terminal (rich) and as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table


def _fmt(v: float, digits: int = 0) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:,.{digits}f}"


def summary_table(summary: dict[str, dict[str, float]], title: str) -> Table:
    table = Table(title=title)
    cols = ("class", "offered", "failed", "SLO met", "satisfaction", "TTFT p50/p90/p99 ms", "TPOT p50/p90 ms",
            "E2E p50/p90/p99 ms", "tok/s", "preempt")
    for c in cols:
        table.add_column(c, justify="right" if c != "class" else "left")
    for name in sorted(summary, key=lambda n: (n == "all", n)):
        r = summary[name]
        table.add_row(name, _fmt(r["offered"]), _fmt(r["failed"]), f"{r['slo_attainment']:.1%}",
                      f"{r['satisfaction']:.3f}",
                      "/".join(_fmt(r[f"ttft_ms_p{q}"]) for q in (50, 90, 99)),
                      "/".join(_fmt(r[f"tpot_ms_p{q}"], 1) for q in (50, 90)),
                      "/".join(_fmt(r[f"e2e_ms_p{q}"]) for q in (50, 90, 99)),
                      _fmt(r["throughput_tok_s"]), _fmt(r["preemptions"]))
    return table


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    return path
