"""Training report for one or more run folders: loss curves, throughput, checkpoint inventory, summary.

    python tools/report.py RUN_DIR [RUN_DIR ...] [--log-scale] [--smooth N] [--out DIR] [--no-load]
    make report RUN=runs/x

What it reads (the contract with training, t2v/runlog.py; everything else in the folder is ignored):
  metrics.jsonl             loss records and t2v.runlog's events (start, resume, checkpoint, val, preview_failed,
                            preempt, done): the run's facts; a truncated last line (a job killed mid-write) is noted
  train.log / slurm-*.out   the text log, read only for what metrics.jsonl does not cover (runs from before it
                            existed): `step 000020 | loss 0.1234` (with optional `| lr X | grad_norm X | N clips/s`),
                            `Out: ... | Device: ...`, `resumed from ... at step N (restart k)`, `saved .../ckpt_N.pt`,
                            `signal SIG.. at step N`; other lines are ignored
  ckpt_*.pt, ckpt_*.pt.corrupt, samples/preview_step*.png, eval/step_*.json, eval/demo_check.json, config.yaml

What it writes: RUN_DIR/report/ only (loss.png, throughput.png, val.png, eval.png, checkpoints.csv,
checkpoints.md, summary.md, and index.html: the same summary as one self-contained page with every preview). With
several runs it also writes loss_overlay.png, compare.md and compare.html (with the configs' differences) into --out
(default: the first run's report folder). It never renames, deletes or rewrites anything else in a run folder: in
particular it does not call t2v.checkpoint.load_latest (which quarantines broken checkpoints).

The log/metrics part needs only pandas + matplotlib; torch is imported lazily by the checkpoint inventory,
so the report also works on a login node without torch (checkpoints are then listed as "not checked").
The work is done in tools/reporting/ (parse, run, stats, inventory, plots, markdown); this file is the command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

# The names below were tools/report.py's own before the split; tests and bench/demo_recipes.py use them from here.
from tools.reporting.inventory import INVENTORY_COLUMNS, _loss_near, inventory, read_evals
from tools.reporting.markdown import _g, md_table, write_checkpoint_tables, write_compare, write_summary
from tools.reporting.parse import (LOSS_COLUMNS, _frame, add_repeats, merge_losses, parse_log,
                                   read_metrics, scan_log)
from tools.reporting.html import write_compare_page, write_run_page
from tools.reporting.plots import plot_eval, plot_loss, plot_throughput, plot_val
from tools.reporting.run import Run, load_run
from tools.reporting.parse import find_duplicates
from tools.reporting.stats import auto_smooth, effective, restart_table, segment_times, smooth, stats

__all__ = ["INVENTORY_COLUMNS", "LOSS_COLUMNS", "Run", "_frame", "_g", "_loss_near", "add_repeats", "auto_smooth",
           "effective", "find_duplicates", "inventory", "load_run", "main", "md_table", "merge_losses", "parse_log",
           "plot_eval", "plot_loss", "plot_throughput", "plot_val", "read_evals", "read_metrics", "report_run",
           "restart_table", "scan_log", "segment_times", "smooth", "stats", "write_checkpoint_tables",
           "write_compare", "write_summary"]


def report_run(run: Run, out_dir: Path, log_scale: bool = False, smooth_span: int = 0, load: bool = True) -> Path:
    """One run's report folder: the figures, the checkpoint tables and summary.md (returned)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"loss": plot_loss([run], out_dir / "loss.png", log_scale, smooth_span),
               "throughput": plot_throughput(run, out_dir / "throughput.png"),
               "val": plot_val(run, out_dir / "val.png"),
               "eval": plot_eval(run, out_dir / "eval.png")}
    inv = inventory(run.path, run.losses, load=load)
    write_checkpoint_tables(inv, out_dir)
    summary = write_summary(run, out_dir, inv, smooth_span, figures)
    write_run_page(run, out_dir, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s); several are overlaid in one plot")
    ap.add_argument("--log-scale", action="store_true", help="loss axis in log scale")
    ap.add_argument("--smooth", type=int, default=0, metavar="N",
                    help="EMA span in logged points for the smoothed loss (default: about 5%% of the points)")
    ap.add_argument("--out", type=Path, default=None,
                    help="one run: where its report goes (default RUN_DIR/report); several runs: where the "
                         "overlay goes (default: the first run's report folder)")
    ap.add_argument("--no-load", action="store_true", help="list checkpoints without loading them (fast)")
    a = ap.parse_args(argv)
    if a.smooth < 0:
        ap.error("--smooth must be >= 0")
    runs = []
    for d in a.runs:
        try:
            runs.append(load_run(d))
        except FileNotFoundError as e:
            print(f"report: {e}", file=sys.stderr)
            return 2
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:  # runs/a/run and runs/b/run: tell them apart in the overlay
            run.name = str(run.path)
    for run in runs:
        out = a.out if (a.out is not None and len(runs) == 1) else run.path / "report"
        summary = report_run(run, out, a.log_scale, a.smooth, load=not a.no_load)
        if run.losses.empty:
            print(f"report: warning: {run.path}: no loss records found", file=sys.stderr)
        print(f"{run.name}: {summary} (page: {summary.with_name('index.html')})")
    if len(runs) > 1:
        out = a.out or runs[0].path / "report"
        out.mkdir(parents=True, exist_ok=True)
        overlay = plot_loss(runs, out / "loss_overlay.png", a.log_scale, a.smooth)
        compare = write_compare(runs, out, a.smooth, overlay)
        print(f"overlay: {overlay}\ncompare: {compare} (page: {write_compare_page(runs, out, compare)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
