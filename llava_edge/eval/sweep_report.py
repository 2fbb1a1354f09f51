"""--report DIR: the side-by-side table and every metric as markdown, and, when K is swept, a PNG of the
headline metric against the median first-answer time at each K (matplotlib, from the bench extra, imported
only here)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..extras import missing_modules
from .benchmarks import BENCHMARKS
from .run import EvalRun
from .table import is_score, markdown_table, rows_of


def write_report(run: EvalRun, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# llava-edge eval: {run.benchmark} ({run.questions} questions)", "", markdown_table(rows_of(run)), "",
             "## Every metric", "", markdown_table(rows_of(run, all_metrics=True)), ""]
    timed = [r for r in run.results if r.side == "bundle" and r.ttft_ms is not None]
    written = []
    if len(timed) > 1:
        png = plot_sweep(run, out / f"{run.benchmark}-image-tokens.png")
        lines += [f"![{run.benchmark}: accuracy against first-answer time]({png.name})", ""]
        written.append(png)
        lines += ["| K | median first-answer time (ms) |", "|---:|---:|"]
        lines += [f"| {r.image_tokens or 'all'} | {r.ttft_ms:.1f} |" for r in timed]
    md = out / f"{run.benchmark}.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [md, *written]


def plot_sweep(run: EvalRun, path: Path) -> Path:
    if missing_modules(("matplotlib",)):
        raise UserError("`llava-edge eval --report` plots a K sweep with matplotlib, not installed here: "
                        "pip install matplotlib (or 'llava-edge[bench]')")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = BENCHMARKS[run.benchmark].HEADLINE[0]
    scale = 1.0 if is_score(run.benchmark, metric) else 100.0
    bundles = [r for r in run.results if r.side == "bundle" and r.ttft_ms is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r.ttft_ms for r in bundles], [scale * r.metrics[metric] for r in bundles], "o-", label="bundle")
    for r in bundles:
        ax.annotate(f"K={r.image_tokens or 'all'}", (r.ttft_ms, scale * r.metrics[metric]),
                    textcoords="offset points", xytext=(4, 4))
    reference = next((r for r in run.results if r.side == "reference"), None)
    if reference is not None:
        ax.axhline(scale * reference.metrics[metric], linestyle="--", color="grey", label="reference (all tokens)")
    ax.set_xlabel("median first-answer time (ms)")
    ax.set_ylabel(f"{run.benchmark} {metric}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
