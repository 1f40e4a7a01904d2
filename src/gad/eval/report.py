"""`gad report`: a Markdown report with PNG plots from run folders and evaluation results.

Training curves come from each run's `metrics.jsonl` (GAD runs: discriminator loss/accuracy,
reward, KL, response length, with the steps that raised a warning marked); the comparison table
comes from `gad eval` / `gad judge` result files (one JSON per system), each metric with its
95% confidence interval where the evaluation computed one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gad.config.load import UserError
from gad.core.tracking import read_metrics

# (metric key in metrics.jsonl, panel title) of the GAD-stage curves.
GAD_PANELS = [
    ("d/loss", "discriminator loss"),
    ("d/accuracy", "discriminator accuracy (teacher > student)"),
    ("reward/mean", "reward: discriminator score of the student"),
    ("g/kl", "KL to the post-warmup student (k3)"),
    ("response/length_mean", "mean response length (tokens)"),
    ("g/entropy", "policy entropy (nats/token)"),
    ("g/sft_loss", "generator SFT loss (warmup)"),
]
SFT_PANELS = [("loss", "SFT loss (response tokens)"), ("tokens_per_s", "tokens/s")]


def _stage_dirs(run: Path) -> list[tuple[str, Path]]:
    """The metric folders of a run: a GAD run has warmup/ and gad/, an SFT run is one folder."""
    found = [
        (f"{run.name}/{s}", run / s)
        for s in ("warmup", "gad")
        if (run / s / "metrics.jsonl").exists()
    ]
    if (run / "metrics.jsonl").exists():
        found.append((run.name, run))
    return found


def plot_curves(name: str, rows: list[dict[str, Any]], out: Path) -> Path | None:
    """One PNG of the known panels present in `rows`; warning steps drawn as red lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(k, t) for k, t in GAD_PANELS + SFT_PANELS if any(k in r for r in rows)]
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 2.8 * nrows), squeeze=False)
    warned = [r["step"] for r in rows if r.get("warnings")]
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5)
        for step in warned:
            ax.axvline(step, color="red", alpha=0.3, lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(name + ("  (red: steps with a warning)" if warned else ""), fontsize=11)
    fig.tight_layout()
    path = out / f"curves-{name.replace('/', '-')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_cell(value: Any) -> str:
    """A metric as a cell: a mean with its interval and the count of records behind it."""
    count = f" (n={value['n']})" if isinstance(value, dict) and "n" in value else ""
    if isinstance(value, dict) and value.get("mean") is None and "mean" in value:
        return "n/a" + count
    if isinstance(value, dict) and "mean" in value:
        if value.get("low") is not None and value.get("high") is not None:
            return f"{value['mean']:.3g} [{value['low']:.3g}, {value['high']:.3g}]{count}"
        return f"{value['mean']:.3g}{count}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def comparison_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: one row per system, one column per metric found in any result."""
    columns: list[str] = []
    for result in results:
        for key in result.get("metrics", {}):
            if key not in columns:
                columns.append(key)
    lines = [
        "| system | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for result in results:
        metrics = result.get("metrics", {})
        lines.append(
            f"| {result.get('name', '?')} | "
            + " | ".join(format_cell(metrics.get(c)) for c in columns)
            + " |"
        )
    return "\n".join(lines)


def as_result(raw: dict[str, Any]) -> dict[str, Any]:
    """A `gad eval` result as is; a `gad judge` result turned into the same shape."""
    if "metrics" in raw or "summary" not in raw:
        return raw
    summary, config = raw["summary"], raw.get("config", {})
    name = Path(config.get("answers", "judged")).stem
    if "win" in summary:  # pairwise
        name = f"{name} vs {Path(config.get('baseline') or 'B').stem}"
        metrics = {k: summary.get(k) for k in ("win_rate", "tie_rate", "lose_rate")}
    else:
        low, high = summary.get("mean_candidate_ci") or (None, None)
        r_low, r_high = summary.get("relative_ci") or (None, None)
        metrics = {
            "judge_score": {"mean": summary.get("mean_candidate"), "low": low, "high": high},
            "judge_relative": {"mean": summary.get("relative"), "low": r_low, "high": r_high},
            "judge_failed": summary.get("failed"),
        }
    return {"name": name, "metrics": metrics}


def _read_result(path: Path) -> dict[str, Any]:
    """A result file's JSON object; anything else is the user's file, named."""
    if not path.is_file():
        what = "a folder, not a result file" if path.is_dir() else "no such file"
        raise UserError(f"results: {path}: {what}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{path}: not a readable result JSON ({detail})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("metrics", raw.get("summary")), dict):
        raise UserError(f"{path}: not a result of `gad eval` or `gad judge` (no metrics)")
    return raw


def _runs_metrics(runs: list[str | Path]) -> list[list[tuple[str, Path]]]:
    """Each run's metric folders; a run that holds none is refused by name (a typo must not
    give a report of nothing)."""
    found = []
    for run in runs:
        path = Path(run)
        if not path.is_dir():
            raise UserError(f"runs: {path}: no such run folder")
        stages = _stage_dirs(path)
        if not stages:
            raise UserError(
                f"runs: {path}: holds no metrics.jsonl (an SFT run has one, a GAD run one in "
                "warmup/ or gad/)"
            )
        found.append(stages)
    return found


def write_report(
    runs: list[str | Path],
    results: list[str | Path],
    out_dir: str | Path,
    title: str = "gad report",
    preface: str = "",
) -> Path:
    """Write `report.md` and its PNGs into `out_dir`; returns the report's path. `preface`
    (Markdown) goes under the title: what was run, with which budget."""
    if not runs and not results:
        raise UserError("nothing to report: give run folders (runs) and/or result files (results)")
    stages = _runs_metrics(runs)
    loaded = [as_result(_read_result(Path(p))) for p in results]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""] + ([preface, ""] if preface else [])
    if loaded:
        parts += ["## Systems compared", "", comparison_table(loaded), ""]
        parts += ["Values are means; brackets give the 95% bootstrap confidence interval.", ""]
        notes = [f"- {r['name']}: {r['note']}" for r in loaded if r.get("note")]
        parts += notes + ([""] if notes else [])
    if runs:
        parts += ["## Training curves", ""]
    for run_stages in stages:
        for name, folder in run_stages:
            rows = read_metrics(folder)
            png = plot_curves(name, rows, out)
            warned = [r for r in rows if r.get("warnings")]
            parts += [f"### {name}", "", f"{len(rows)} logged steps."]
            if warned:
                parts.append(
                    f"{len(warned)} step(s) with warnings, e.g. step {warned[0]['step']}: "
                    f"{warned[0]['warnings'][0]}"
                )
            if png:
                parts += ["", f"![{name}]({png.name})"]
            parts.append("")
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path
