"""The report's figures: loss.png, throughput.png, val.png, eval.png, and loss_overlay.png for several runs.

matplotlib with the Agg backend (no display on a compute or login node), imported on the first figure only. A
figure with nothing to show is still written, with a message saying why, so that summary.md never links to a
missing file. Each PNG is written atomically (t2v.files.atomic_path): a report killed mid-way leaves the old
figure or the new one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from t2v.files import atomic_path
from tools.reporting.inventory import eval_metrics
from tools.reporting.run import Run
from tools.reporting.stats import auto_smooth, effective, smooth


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")  # the temporary name has no .png for savefig to go by
    finally:
        _plt().close(fig)  # pyplot keeps every open figure alive otherwise


def _message_figure(path: Path, title: str, message: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=12, transform=ax.transAxes)
    _save(fig, path)
    return Path(path)


def _mark_resumes(ax, run: Run, color: str, label: str | None) -> None:
    for i, s in enumerate(run.resumes["step"] if len(run.resumes) else []):
        ax.axvline(float(s), color=color, ls="--", lw=1.0, alpha=0.7, label=label if i == 0 else None)


def plot_loss(runs: Sequence[Run], path: str | os.PathLike, log_scale: bool = False, smooth_span: int = 0) -> Path:
    """Raw loss (thin, one line per process segment, so a replayed range shows twice), its EMA, the learning
    rate on a second y axis, dashed lines where the job resumed. Several runs overlay with a legend."""
    path = Path(path)
    runs = [r for r in runs if len(r.losses)]
    if not runs:
        return _message_figure(path, "loss", "no loss records found\n(no metrics.jsonl, no step lines in the logs)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=100)
    ax2 = None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    many = len(runs) > 1
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        pre = f"{run.name}: " if many else ""
        L, eff = run.losses, effective(run.losses)
        span = smooth_span or auto_smooth(len(eff))
        for j, (_, seg) in enumerate(L.groupby("segment", sort=True)):
            ax.plot(seg["step"], seg["loss"], color=c, lw=0.8, alpha=0.45, label=f"{pre}loss" if j == 0 else None)
        ax.plot(eff["step"], smooth(eff["loss"], span), color=c, lw=2.0, label=f"{pre}loss EMA ({span})")
        _mark_resumes(ax, run, c, f"{pre}resume")
        if eff["lr"].notna().any():
            ax2 = ax2 or ax.twinx()
            ax2.plot(eff["step"], eff["lr"], color=c, lw=1.0, ls=":", label=f"{pre}lr")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" + (" (log scale)" if log_scale else ""))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title("loss: " + (", ".join(r.name for r in runs) if many else runs[0].name))
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_throughput(run: Run, path: str | os.PathLike) -> Path:
    """clips/s and step time against step (two panels), dashed lines at resumes."""
    path = Path(path)
    L = run.losses
    if L.empty or not (L["clips_per_s"].notna().any() or L["step_time"].notna().any()):
        return _message_figure(path, f"throughput: {run.name}",
                               "no throughput data\n(the text log has no clips/s; "
                               "metrics.jsonl is missing or has none)")
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), dpi=100, sharex=True)
    for ax, col, label in ((axes[0], "clips_per_s", "clips/s"), (axes[1], "step_time", "step time (s)")):
        for j, (_, seg) in enumerate(L.groupby("segment", sort=True)):
            ax.plot(seg["step"], seg[col], color="C0", lw=1.0, marker=".", ms=3, label=label if j == 0 else None)
        _mark_resumes(ax, run, "C3", "resume")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if not L[col].notna().any():
            ax.text(0.5, 0.5, f"no {label} data", ha="center", va="center", transform=ax.transAxes)
        ax.legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("step")
    axes[0].set_title(f"throughput: {run.name}")
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_eval(run: Run, path: str | os.PathLike) -> Path | None:
    """Each numeric eval metric against step (needs >= 2 eval files)."""
    metrics = eval_metrics(run.evals)
    if len(run.evals) < 2 or not metrics:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 3 * len(metrics) + 1), dpi=100, sharex=True,
                             squeeze=False)
    for ax, m in zip(axes[:, 0], metrics):
        ax.plot(run.evals["step"], run.evals[m], marker="o")
        ax.set_ylabel(m)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(f"evaluation: {run.name}")
    fig.tight_layout()
    _save(fig, path)
    return Path(path)


def plot_val(run: Run, path: str | os.PathLike) -> Path | None:
    """Validation loss against step, one curve per fixed timestep (needs >= 1 record)."""
    per_t = [c for c in run.val.columns if c.startswith("val_loss_t")]
    if run.val.empty or not per_t:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    for c in per_t:
        ax.plot(run.val["step"], run.val[c], marker="o", label=f"t = {c[len('val_loss_t'):]}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (EMA, fixed noise)")
    ax.set_title(f"validation loss at fixed timesteps: {run.name}")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return Path(path)
