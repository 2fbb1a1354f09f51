"""The paper's table, side by side: benchmark, metric, reference, bundle (at each K), Δ, and the share of questions
both sides answered alike; as text, as one JSON object, and as markdown."""

from __future__ import annotations

from dataclasses import dataclass

from .benchmarks import BENCHMARKS
from .run import EvalRun, SideResult


@dataclass
class Row:
    benchmark: str
    metric: str
    image_tokens: int | None
    reference: float | None
    bundle: float | None
    delta: float | None
    identical: float | None  # share of questions whose answers are the same text on both sides


def is_score(benchmark: str, metric: str) -> bool:
    """MME's metrics are points (acc×100 + acc+×100), everything else a fraction shown as a percentage."""
    return benchmark == "mme" and not metric.endswith(("/acc", "/acc+"))


def identical_share(a: SideResult, b: SideResult) -> float:
    return sum(a.answers[k] == b.answers[k] for k in a.answers) / len(a.answers) if a.answers else 0.0


def rows_of(run: EvalRun, all_metrics: bool = False) -> list[Row]:
    reference = next((r for r in run.results if r.side == "reference"), None)
    bundles = [r for r in run.results if r.side == "bundle"] or [None]
    shown = run.results[0].metrics if all_metrics and run.results else BENCHMARKS[run.benchmark].HEADLINE
    rows = []
    for bundle in bundles:
        for metric in shown:
            ref = reference.metrics.get(metric) if reference else None
            got = bundle.metrics.get(metric) if bundle else None
            if ref is None and got is None:
                continue
            rows.append(Row(run.benchmark, metric, bundle.image_tokens if bundle else None, ref, got,
                            got - ref if ref is not None and got is not None else None,
                            identical_share(reference, bundle) if reference and bundle else None))
    return rows


def _value(row: Row, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    shown = value if is_score(row.benchmark, row.metric) else 100 * value
    return f"{shown:+.1f}" if signed else f"{shown:.1f}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| benchmark | metric | K | reference | bundle | Δ | identical answers |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        k = "all" if row.image_tokens is None else str(row.image_tokens)
        same = "–" if row.identical is None else f"{100 * row.identical:.1f}%"
        lines.append(f"| {row.benchmark} | {row.metric} | {k} | {_value(row, row.reference)} | "
                     f"{_value(row, row.bundle)} | {_value(row, row.delta, True)} | {same} |")
    return "\n".join(lines)


def as_json(run: EvalRun, rows: list[Row]) -> dict:
    return {
        "benchmark": run.benchmark, "questions": run.questions, "interrupted": run.interrupted,
        "failed": run.failed, "rows": [row.__dict__ for row in rows],
        "sides": [{"side": r.side, "model": r.model, "image_tokens": r.image_tokens, "ttft_ms": r.ttft_ms,
                   "metrics": r.metrics} for r in run.results],
    }
