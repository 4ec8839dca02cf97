"""The report's Markdown: summary.md for one run, checkpoints.md/.csv (the inventory), compare.md for several.

Every table goes through t2v.table.markdown_table (the project's one renderer, which escapes `|`); the cells are
formatted here, where it is known what they hold: a float with up to four decimals, a missing value as an empty
cell, a flag as yes/no. Every file is written atomically (t2v.files.write_text).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from t2v.files import write_text
from t2v.table import markdown_table
from tools.reporting.inventory import eval_metrics
from tools.reporting.run import Run
from tools.reporting.parse import AGREE_ATOL, AGREE_RTOL
from tools.reporting.stats import restart_table, stats


def _cell(v: Any) -> str:
    """A value as a table cell (markdown_table escapes it)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return _g(float(v))
    return str(v)


def _g(x: float | None, digits: int = 4) -> str:
    """Fixed-point with up to `digits` decimals (trailing zeros dropped); scientific when tiny or huge."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x == 0 or 10 ** -(digits - 1) <= abs(x) < 1e6:
        return f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return f"{x:.{digits - 1}e}"


def md_table(df: pd.DataFrame | None) -> str:
    """A data frame as a Markdown table (one line per row, the columns as header), or "(none)"."""
    if df is None or df.empty:
        return "(none)\n"
    rows = ([_cell(v) for v in row] for row in df.itertuples(index=False, name=None))
    return markdown_table(list(df.columns), rows) + "\n"


def _dur(s: float) -> str:
    s = int(round(s))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _target_steps(cfg: dict | None) -> int | None:
    try:
        return int(cfg["train"]["steps"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None


def write_checkpoint_tables(inv: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """checkpoints.csv (for scripts) and checkpoints.md (for people): the inventory, one row per file."""
    csv, md = out_dir / "checkpoints.csv", out_dir / "checkpoints.md"
    write_text(csv, inv.to_csv(index=False))
    write_text(md, "# Checkpoints\n\nresume_pick: the checkpoint a resume would load (the newest that loads and "
               "verifies; *.corrupt files are never picked).\n\n" + md_table(inv))
    return csv, md


def write_summary(run: Run, out_dir: str | os.PathLike, inv: pd.DataFrame | None = None,
                  smooth_span: int = 0, figures: dict[str, Path | None] | None = None) -> Path:
    """summary.md: progress numbers, restarts, duplicated steps, checkpoints, evaluation, figures."""
    out_dir = Path(out_dir)
    s = stats(run, smooth_span)
    figures = figures or {}
    rel = lambda p: Path(os.path.relpath(p, out_dir)).as_posix()  # noqa: E731
    L = [f"# Run report: {run.name}", "", f"Run folder: `{run.path}`  ",
         f"Read: {'; '.join(run.sources) or 'nothing (no metrics.jsonl, no train.log or slurm-*.out)'}", ""]
    L += ["## Progress", ""]
    target = _target_steps(run.config)
    if s["last_step"] is None:
        L.append("- steps done: 0 (no loss records found)")
    else:
        pct = f" of {target} ({100 * s['last_step'] / target:.0f}%)" if target else ""
        L.append(f"- steps done: {s['last_step']}{pct} (highest step logged)")
    if "wall_s" in s:
        gap = s["span_s"] - s["wall_s"]
        L.append(f"- wall time: {_dur(s['wall_s'])} ({s['wall_s']:.0f} s): sum over {s['timed_segments']} process "
                 f"segment(s) of first-to-last timestamp in metrics.jsonl; excludes {_dur(gap)} ({gap:.0f} s) "
                 f"between segments (queue/requeue waits); calendar span {_dur(s['span_s'])} ({s['span_s']:.0f} s)")
    else:
        L.append("- wall time: unknown (the text log has no timestamps and there is no metrics.jsonl)")
    steps = ", ".join(str(x) for x in s["resume_steps"])
    L.append(f"- restarts: {s['restarts']}" + (f" (resumed at step {steps})" if steps else "")
             + (f"; {s['steps_redone']} step(s) computed again after resuming from an older checkpoint"
                if s["steps_redone"] else "")
             + (f"; {s['segments']} process segments in the logs (some restarts left no resume marker)"
                if s["segments"] > s["restarts"] + 1 else ""))
    if "best_loss" in s:
        L.append(f"- best loss: {_g(s['best_loss'])} at step {s['best_step']}")
        how = f"EMA over {s['smooth_span']} points" if s["smooth_span"] > 1 else "smoothing off"
        L.append(f"- last loss: {_g(s['last_loss'])} at step {s['last_loss_step']} "
                 f"(smoothed, {how}: {_g(s['smoothed_last'])})")
    L.append(f"- mean clips/s: {_g(s['clips_per_s_mean'], 3)}" if s["clips_per_s_mean"] is not None
             else "- mean clips/s: n/a (no throughput data)")
    if s["step_time_median"] is not None:
        L.append(f"- median step time: {_g(s['step_time_median'], 3)} s")
    if s["preview_failures"]:
        L.append(f"- preview failures: {s['preview_failures']} (see train.log warnings)")
    if run.latest_sample is not None:
        p = rel(run.latest_sample)
        L += ["", f"Latest sample grid: [{run.latest_sample.name}]({p})", "", f"![latest sample]({p})"]
    L += ["", "## Figures", ""]
    for key in ("loss", "throughput", "val", "eval"):
        if figures.get(key):
            L.append(f"![{key}]({rel(figures[key])})")
    if len(run.resumes):
        L += ["", "## Restarts", "", md_table(restart_table(run))]
    dup = run.duplicates
    L += ["", "## Duplicated steps", ""]
    if dup.empty:
        L.append("No step was logged twice.")
    else:
        n_bad = int((~dup["agree"]).sum())
        L += [f"{dup['step'].nunique()} step(s) were logged again after a resume from an older checkpoint; "
              f"{n_bad} of {len(dup)} repeat(s) disagree with the first value "
              f"(tolerance rtol {AGREE_RTOL:g}, atol {AGREE_ATOL:g}). Both values are kept in the data; "
              "curves and the last loss use the later one.", "", md_table(dup)]
    L += ["", "## Checkpoints", ""]
    L.append(md_table(inv) if inv is not None else "(not inventoried)")
    L += ["", "## Validation loss", ""]
    if run.val.empty:
        L.append("No validation records (train.val_every = 0, or no validation manifest).")
    else:
        L += ["EMA model, fixed clips, timesteps and noise: comparable across steps, restarts and runs.", "",
              md_table(run.val.tail(10))]
    if run.demo_check is not None:
        d = run.demo_check
        seeds = len(d.get("seeds") or [0])  # tools/demo_check.py --samples N: every prompt N times
        what = f"{d.get('num')} prompts" if seeds == 1 else f"{d.get('num') // seeds} prompts x {seeds} sampling seeds"
        L += ["", "## Demo check", "",
              f"Step {d.get('step')}: {what} sampled ({d.get('sampler', 'DDIM')} {d.get('ddim_steps')}, guidance "
              f"{d.get('guidance')}) and judged by their pixels (tools/demo_check.py).", "",
              md_table(pd.DataFrame([{"colour": d.get("color"), "shape": d.get("shape"), "motion": d.get("motion"),
                                      "all three": d.get("all"), "background brightness": d.get("background")}])),
              "", "Chance: colour 25%, shape 33%, motion 25%; background brightness 0 = black."]
    L += ["", "## Evaluation", ""]
    if run.evals.empty:
        L.append("No eval/step_*.json files.")
    else:
        cols = ["step"] + eval_metrics(run.evals) + [c for c in ("num", "file") if c in run.evals]
        L.append(md_table(run.evals[cols]))
    if run.notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in run.notes]
    return write_text(out_dir / "summary.md", "\n".join(L).rstrip() + "\n")


def write_compare(runs: Sequence[Run], out_dir: Path, smooth_span: int, overlay: Path) -> Path:
    """compare.md: the overlay figure and one row of headline numbers per run, linking to each summary."""
    rows = []
    for r in runs:
        s = stats(r, smooth_span)
        rows.append({"run": r.name, "steps done": s["last_step"], "best loss": s.get("best_loss"),
                     "last loss": s.get("last_loss"), "smoothed last": s.get("smoothed_last"),
                     "restarts": s["restarts"], "mean clips/s": s["clips_per_s_mean"],
                     "wall time": _dur(s["wall_s"]) if "wall_s" in s else "unknown",
                     "report": Path(os.path.relpath(r.path / "report" / "summary.md", out_dir)).as_posix()})
    return write_text(out_dir / "compare.md",
                      f"# Runs compared\n\n![loss]({overlay.name})\n\n" + md_table(pd.DataFrame(rows)))
