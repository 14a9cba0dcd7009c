"""Calibration of the output-length predictor on a held-out split of the Azure traces.

Time-ordered split: learn from the first 80% of a trace (prompt length only: the traces carry no text),
predict the last 20% without learning from it. Reports the mean pinball loss over the 0.1/0.5/0.9 quantiles
and the share of actual lengths inside the predicted 10-90% range (ideal: 80%), against the class prior the
predictor starts from. ``python -m bench.predictor`` prints a table and writes JSON.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.report import write_json
from bench.traces import default_trace_path, load_azure
from profiler import priors
from profiler.predictor import LengthPredictor, pinball_loss

TRACES = {"conv": "interactive", "code": "code"}


def evaluate(trace: str, slo_class: str, train_share: float = 0.8) -> dict:
    rows = load_azure(default_trace_path(trace))
    cut = int(len(rows) * train_share)
    predictor = LengthPredictor()
    for r in rows[:cut]:
        predictor.observe(slo_class, r.input_tokens, "", r.output_tokens)
    test = rows[cut:]
    out = {}
    for name, predict in (("class prior", lambda r: priors.prior(slo_class, 0)),
                          ("learned", lambda r: predictor.predict(slo_class, r.input_tokens, "")[0])):
        preds = [predict(r) for r in test]
        out[name] = {
            "pinball": float(np.mean([pinball_loss(r.output_tokens, p) for r, p in zip(test, preds)])),
            "coverage_10_90": float(np.mean([p[0] <= r.output_tokens <= p[2] for r, p in zip(test, preds)])),
            "median_abs_error": float(np.median([abs(r.output_tokens - p[1]) for r, p in zip(test, preds)])),
        }
    return {"trace": trace, "slo_class": slo_class, "train": cut, "test": len(test), "results": out}


def run(out: Path | None = Path("bench/results/predictor.json")) -> dict:
    console = Console(stderr=True)
    reports = [evaluate(trace, cls) for trace, cls in TRACES.items()]
    table = Table(title="output-length predictor on the last 20% of each Azure trace (learned from the first 80%)")
    for col in ("trace", "predictor", "pinball loss", "in 10-90% range (ideal 80%)", "median |error| of p50"):
        table.add_column(col, justify="right")
    for rep in reports:
        for name, r in rep["results"].items():
            table.add_row(f"{rep['trace']} ({rep['test']:,})", name, f"{r['pinball']:.1f}",
                          f"{r['coverage_10_90']:.1%}", f"{r['median_abs_error']:.0f}")
    console.print(table)
    if out is not None:
        console.print(f"results: {write_json(out, {'reports': reports})}")
    return {"reports": reports}


if __name__ == "__main__":
    run()
