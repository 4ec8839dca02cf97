"""tools/report.py: log/metrics parsing, duplicated steps, checkpoint inventory, figures and summary.

The run folders are built here by hand, following the contract training writes to: a job that ran three
times (killed at step 240 with a broken ckpt_000240.pt, so the resume went back to 180 and steps 200-240
were trained twice; then preempted with SIGUSR1 at 310 and resumed from there), with junk in the log, a
truncated last line in metrics.jsonl, a truncated checkpoint and a pickle bomb.
"""
from __future__ import annotations

import json
from datetime import datetime
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from t2v.checkpoint import REQUIRED_KEYS, save_checkpoint
from tools import report as R

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0
T1 = T0 + 1000.0  # second process started after 1000 s in the queue (seg 0 ran 125.5 s)
T2 = T1 + 2000.0
SEG_ELAPSED = [125.5, 69.5, 50.0]  # first-to-last timestamp per process segment, as laid out below
WALL = sum(SEG_ELAPSED)  # 245 s
JUNK = [
    "/opt/venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py:558: UserWarning: This DataLoader "
    "will create 4 worker processes in total.",
    "Traceback (most recent call last):",
    '  File "/code/t2v/train.py", line 312, in <module>',
    "RuntimeError: CUDA error: an illegal memory access was encountered",
    "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d5c8a0] moov atom not found",
    "step | loss",
    "loss 0.5000 at step 30",
    "step 000abc | loss 0.1",
    "srun: error: node12: task 0: Killed",
    "slurmstepd: error: *** JOB 4242 ON node12 CANCELLED AT 2024-01-01T00:00:00 DUE TO PREEMPTION ***",
    "\x00\x00\xff garbage \ufffd",
    "100%|##########| 50/50 [00:01<00:00, 30.1it/s]",
    "",
]
BAD_240 = "warning: {d}/ckpt_000240.pt: corrupt or truncated (PytorchStreamReader failed); falling back to the " \
          "previous checkpoint (kept as ckpt_000240.pt.corrupt)"


def loss_at(step: int, seg: int = 0, scale: float = 1.0) -> float:
    v = round(scale / (1 + step / 100), 4)
    return round(v + 0.05, 4) if (step == 220 and seg == 1) else v  # the one repeat that disagrees


def lr_at(step: int) -> float:
    return 1e-4 * min(1.0, step / 100)


# (segment, restart, steps, clips/s, step_time, start time, resumed-from step, checkpoints saved)
SEGMENTS = [
    (0, 0, range(20, 241, 20), 4.0, 0.5, T0, None, [60, 120, 180, 240]),
    (1, 1, range(200, 301, 20), 5.0, 0.4, T1, 180, [240, 300]),
    (2, 2, range(320, 401, 20), 6.0, 0.3, T2, 310, [360, 400]),
]
# (step, loss, segment) of every record in the order logged
EXPECTED = [(s, loss_at(s, seg), seg) for seg, _, steps, *_ in SEGMENTS for s in steps]


def step_time(seg_start: float, resumed: int | None, step: int) -> float:
    return seg_start + 5 + 0.5 * (step - (resumed or 0))


def write_log(d: Path, *, extras: bool = True, junk: bool = True, scale: float = 1.0, segments=SEGMENTS,
              name: str = "train.log") -> list[str]:
    lines = []
    for seg, restart, steps, clips, st, t, resumed, saves in segments:
        lines.append(f"Out: {d} | Device: cpu")
        if resumed is not None:
            if seg == 1:
                lines.append(BAD_240.format(d=d))
            lines.append(f"resumed from {d}/ckpt_{resumed:06d}.pt at step {resumed} (restart {restart})")
        if junk:
            lines += JUNK[seg * 4:(seg + 1) * 4 + (len(JUNK) if seg == 2 else 0)]
        for s in steps:
            extra = f" | lr {lr_at(s):.1e} | grad_norm 0.50 | {clips:.1f} clips/s" if extras else ""
            lines.append(f"step {s:06d} | loss {loss_at(s, seg, scale):.4f}{extra}")
            if s in saves:
                lines.append(f"saved {d}/ckpt_{s:06d}.pt")
        if seg == 1:
            lines += ["signal SIGUSR1 at step 310: saving and exiting for requeue", f"saved {d}/ckpt_000310.pt"]
    (d / name).write_text("\n".join(lines) + "\n")
    return lines


def write_metrics(d: Path) -> None:
    recs = []
    for seg, restart, steps, clips, st, t, resumed, saves in SEGMENTS:
        if resumed is None:  # as t2v/train.py does: "start" for a fresh run, "resume" after a requeue
            recs.append({"event": "start", "step": 0, "time": t, "restart": restart})
        else:
            recs.append({"event": "resume", "step": resumed, "time": t + 1, "restart": restart,
                         "path": str(d / f"ckpt_{resumed:06d}.pt")})
        for s in steps:
            ts = step_time(t, resumed, s)
            recs.append({"step": s, "loss": loss_at(s, seg) + 1e-6, "lr": lr_at(s), "grad_norm": 0.5,
                         "clips_per_s": clips, "step_time": st, "time": ts, "restart": restart, "world_size": 1})
            if s in saves:
                recs.append({"event": "checkpoint", "step": s, "time": ts + 0.5, "restart": restart,
                             "path": str(d / f"ckpt_{s:06d}.pt")})
        if seg == 1:
            recs.append({"event": "preempt", "step": 310, "time": t + 70, "restart": 1, "signal": "SIGUSR1"})
            recs.append({"event": "checkpoint", "step": 310, "time": t + 70.5, "restart": 1})
    recs.append({"event": "done", "step": 400, "time": T2 + 51, "restart": 2})
    text = "\n".join(json.dumps(r) for r in recs[:10]) + "\n\n" + "\n".join(json.dumps(r) for r in recs[10:])
    (d / "metrics.jsonl").write_text(text + '\n{"step": 420, "loss": 0.2')  # killed mid-write


def ckpt_state(step: int, time: float | None = None) -> dict:
    state = {"format": 1, "step": step, "model": {"w": torch.ones(4, 4)}, "ema": {"w": torch.ones(4, 4)},
             "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "config": {}, "rng": {}, "data": {}}
    assert set(REQUIRED_KEYS) <= state.keys()
    if time is not None:
        state["time"] = time
    return state


class Bomb:
    """Unpickling this would create a file: proof that the inventory never executes pickled code."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def write_truncated(path: Path, step: int) -> None:
    save_checkpoint(ckpt_state(step, T0), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_checkpoints(d: Path) -> Path:
    save_checkpoint(ckpt_state(180), d / "ckpt_000180.pt")  # no "time" key: mtime is used
    write_truncated(d / "ckpt_000240.pt.corrupt", 240)  # quarantined by the resume of restart 1
    save_checkpoint(ckpt_state(240, T1 + 35.5), d / "ckpt_000240.pt")
    save_checkpoint(ckpt_state(300, T1 + 65.5), d / "ckpt_000300.pt")
    save_checkpoint(ckpt_state(310, T1 + 70.5), d / "ckpt_000310.pt")
    sentinel = d.parent / f"{d.name}-BOMB-WENT-OFF"
    bomb = ckpt_state(360, T2 + 30.5)
    bomb["model"] = {"w": Bomb(sentinel)}
    torch.save(bomb, d / "ckpt_000360.pt")
    write_truncated(d / "ckpt_000400.pt", 400)
    return sentinel


def make_run(root: Path, name: str = "run_a", *, metrics: bool = True, ckpts: bool = True,
             scale: float = 1.0) -> Path:
    d = root / name
    (d / "samples").mkdir(parents=True)
    (d / "eval").mkdir()
    write_log(d, extras=metrics, scale=scale)
    if metrics:
        write_metrics(d)
    if ckpts:
        write_checkpoints(d)
    from PIL import Image
    for s in (200, 400):
        Image.new("RGB", (64, 32), (s % 255, 0, 0)).save(d / "samples" / f"preview_step{s:06d}.png")
    (d / "eval" / "step_000200.json").write_text(json.dumps({"step": 200, "clipsim": 0.21, "fvd": 850.0, "num": 64}))
    (d / "eval" / "step_000400.json").write_text(json.dumps({"step": 400, "clipsim": 0.25, "fvd": 700.5, "num": 64}))
    (d / "config.yaml").write_text("train:\n  steps: 1000\n  log_every: 20\n")
    return d


@pytest.fixture
def run_a(tmp_path):
    return make_run(tmp_path)


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(d.rglob("*")) if p.is_file() and "report" not in p.relative_to(d).parts}


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


# ------------------------------------------------------------------------------------------------- parsing
def test_parse_log_exact_steps_losses_segments_and_extras(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    lines = write_log(d)
    df = R.parse_log(lines)
    assert list(df.columns) == R.LOSS_COLUMNS
    assert list(zip(df["step"], df["loss"], df["segment"])) == EXPECTED
    assert list(df["restart"]) == [seg for seg, _, steps, *_ in SEGMENTS for _ in steps]
    assert (df["source"] == "log").all() and df["time"].isna().all()
    assert df["lr"].tolist() == pytest.approx([float(f"{lr_at(s):.1e}") for s, _, _ in EXPECTED])
    assert df["clips_per_s"].tolist() == [4.0] * 12 + [5.0] * 6 + [6.0] * 5
    assert (df["grad_norm"] == 0.5).all()
    # steps 200-240 were trained twice: the second time is marked, not dropped
    rep = df[df["repeat"] > 0]
    assert rep["step"].tolist() == [200, 220, 240] and (rep["segment"] == 1).all()
    assert df.loc[df["step"] == 220, "loss"].tolist() == [loss_at(220, 0), loss_at(220, 1)]


def test_parse_log_baseline_format_and_junk_only(tmp_path):
    lines = ["Out: /scratch/runs/x | Device: cuda", "step 000020 | loss 0.1234", *JUNK,
             "2024-05-01 10:00:00 INFO step 000040 | loss 0.0987 | lr 1.0e-04 | 3.1 clips/s",
             "step 000060 | loss nan", "saved /scratch/runs/x/ckpt_000060.pt",
             "signal stop_at at step 60: saving and exiting for requeue"]
    df = R.parse_log(lines)
    assert df["step"].tolist() == [20, 40, 60]
    assert df["loss"].iloc[:2].tolist() == [0.1234, 0.0987] and math.isnan(df["loss"].iloc[2])
    assert df["lr"].iloc[1] == 1e-4 and df["clips_per_s"].iloc[1] == 3.1 and math.isnan(df["lr"].iloc[0])
    assert R.parse_log(JUNK).empty and R.parse_log([]).columns.tolist() == R.LOSS_COLUMNS
    _, ev = R.scan_log(lines)
    assert ev["event"].tolist() == ["start", "checkpoint", "preempt"] and ev["step"].iloc[1] == 60
    assert ev["path"].iloc[2] == "stop_at"


def test_scan_log_events(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    _, ev = R.scan_log(write_log(d))
    res = ev[ev["event"] == "resume"]
    assert res["step"].tolist() == [180, 310] and res["restart"].tolist() == [1, 2]
    assert res["path"].tolist() == [f"{d}/ckpt_000180.pt", f"{d}/ckpt_000310.pt"]
    assert ev.loc[ev["event"] == "preempt", ["step", "path"]].values.tolist() == [[310, "SIGUSR1"]]
    assert ev.loc[ev["event"] == "checkpoint", "step"].tolist() == [60, 120, 180, 240, 240, 300, 310, 360, 400]
    assert (ev["event"] == "start").sum() == 3


def test_read_metrics_truncated_last_line_and_blank_lines(tmp_path):
    write_metrics(tmp_path)
    notes: list[str] = []
    steps, events = R.read_metrics(tmp_path / "metrics.jsonl", notes)
    assert list(zip(steps["step"], steps["segment"])) == [(s, seg) for s, _, seg in EXPECTED]
    assert steps["loss"].tolist() == pytest.approx([l + 1e-6 for _, l, _ in EXPECTED], abs=1e-12)
    assert 420 not in steps["step"].tolist()
    assert any("truncated" in n for n in notes)
    assert steps["time"].iloc[0] == step_time(T0, None, 20) and steps["restart"].iloc[-1] == 2
    assert steps["repeat"].sum() == 3 and (steps["source"] == "metrics").all()
    assert events["event"].value_counts().to_dict() == {"start": 1, "resume": 2, "checkpoint": 9, "preempt": 1,
                                                        "done": 1}
    assert events.loc[events["event"] == "resume", "step"].tolist() == [180, 310]


def test_load_run_prefers_metrics_and_keeps_restarts(run_a):
    run = R.load_run(run_a)
    L = run.losses
    assert (L["source"] == "metrics").all() and len(L) == len(EXPECTED)
    assert L["loss"].iloc[0] == pytest.approx(loss_at(20) + 1e-6, abs=1e-12)  # full precision, not the log's
    assert run.resumes["step"].tolist() == [180, 310] and run.resumes["restart"].tolist() == [1, 2]
    assert [p.name for p in run.samples] == ["preview_step000200.png", "preview_step000400.png"]
    assert run.evals["step"].tolist() == [200, 400] and run.evals["fvd"].tolist() == [850.0, 700.5]
    assert run.config["train"]["steps"] == 1000
    st = R.segment_times(run)
    assert st["elapsed"].tolist() == pytest.approx(SEG_ELAPSED)


def test_logs_only_run(tmp_path):
    d = make_run(tmp_path, "old", metrics=False, ckpts=False, scale=1.1)
    run = R.load_run(d)
    assert (run.losses["source"] == "log").all()
    assert list(zip(run.losses["step"], run.losses["segment"])) == [(s, seg) for s, _, seg in EXPECTED]
    assert run.losses["loss"].tolist() == [loss_at(s, seg, 1.1) for s, _, seg in EXPECTED]
    assert run.resumes["step"].tolist() == [180, 310]
    out = tmp_path / "out"
    assert R.main([str(d), "--out", str(out)]) == 0
    assert not (d / "report").exists()  # --out with one run: the report goes there instead
    w, h = image_size(out / "throughput.png")  # "no throughput data" figure, not a crash
    assert w > 300 and h > 300
    text = (out / "summary.md").read_text()
    assert "wall time: unknown" in text and "mean clips/s: n/a" in text
    assert "restarts: 2 (resumed at step 180, 310)" in text
    assert "steps done: 400 of 1000 (40%)" in text


def test_slurm_logs_only(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    lines = write_log(d, extras=False, junk=False, segments=SEGMENTS[:1], name="slurm-101.out")
    (d / "slurm-101.out").write_text("\n".join(["module load cuda", *lines, "srun: job done"]) + "\n")
    write_log(d, extras=False, junk=True, segments=SEGMENTS[1:], name="slurm-102.out")
    run = R.load_run(d)
    assert list(zip(run.losses["step"], run.losses["loss"], run.losses["segment"])) == EXPECTED
    assert "slurm-101.out, slurm-102.out" in run.sources[0]


def test_train_log_and_slurm_log_not_counted_twice(run_a):
    (run_a / "metrics.jsonl").unlink()
    (run_a / "slurm-7.out").write_text("noise\n" + (run_a / "train.log").read_text())
    run = R.load_run(run_a)
    assert len(run.losses) == len(EXPECTED) and run.sources[0].startswith("train.log")


def test_metrics_started_mid_run_keeps_older_log_records(tmp_path):
    log = R.parse_log([f"step {s:06d} | loss {s / 1000:.4f}" for s in (20, 40, 60)]
                      + ["resumed from x/ckpt_000040.pt at step 40 (restart 1)", "step 000060 | loss 0.0600"])
    met = R.add_repeats(R._frame([{"step": 60, "loss": 0.06, "time": 1.0, "restart": 1, "source": "metrics",
                                   "segment": 0}], R.LOSS_COLUMNS))
    m = R.merge_losses(met, log)
    assert m["step"].tolist() == [20, 40, 60, 60] and m["source"].tolist() == ["log"] * 3 + ["metrics"]
    assert m["segment"].tolist() == [0, 0, 0, 1] and m["repeat"].tolist() == [0, 0, 0, 1]


def test_restart_counter_constant_outside_slurm(tmp_path):
    """Without SLURM_RESTART_COUNT every record says restart 0: segments come from the resume markers, and
    two resumes from the same checkpoint are two restarts."""
    recs = [{"event": "start", "step": 0, "time": 0.0, "restart": 0}]
    t = 0.0
    for seg, steps in enumerate(([10, 20, 30], [20, 30], [20, 30, 40])):
        if seg:
            t += 100
            recs.append({"event": "resume", "step": 10, "time": t, "restart": 0})
        for s in steps:
            t += 1
            recs.append({"step": s, "loss": 1.0 / s, "time": t, "restart": 0})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    run = R.load_run(tmp_path)
    assert run.losses["segment"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert run.losses["repeat"].tolist() == [0, 0, 0, 1, 1, 2, 2, 0]
    assert run.resumes["step"].tolist() == [10, 10] and run.resumes["segment"].tolist() == [1, 2]
    assert R.restart_table(run)["steps redone"].tolist() == [20, 20]
    assert R.find_duplicates(run.losses)["step"].tolist() == [20, 30, 20, 30]
    assert R.segment_times(run)["elapsed"].tolist() == [3.0, 2.0, 3.0]


# ----------------------------------------------------------------------------------------- duplicated steps
def test_duplicated_steps_detected_with_both_values(run_a):
    dup = R.load_run(run_a).duplicates
    assert dup["step"].tolist() == [200, 220, 240]
    assert dup["agree"].tolist() == [True, False, True]
    row = dup.set_index("step").loc[220]
    assert row["loss_first"] == pytest.approx(loss_at(220, 0) + 1e-6)
    assert row["loss_again"] == pytest.approx(loss_at(220, 1) + 1e-6)
    assert (row["segment_first"], row["segment_again"]) == (0, 1)
    eff = R.effective(R.load_run(run_a).losses)
    assert eff["step"].is_unique and eff.set_index("step").loc[220, "loss"] == pytest.approx(loss_at(220, 1) + 1e-6)


def test_no_duplicates_frame_is_empty():
    df = R.parse_log([f"step {s:06d} | loss 0.5" for s in (20, 40)])
    assert R.find_duplicates(df).empty and R.find_duplicates(R.parse_log([])).empty


# ---------------------------------------------------------------------------------------------- inventory
def test_inventory_statuses_and_resume_pick(run_a):
    sentinel = run_a.parent / f"{run_a.name}-BOMB-WENT-OFF"
    before = snapshot(run_a)
    run = R.load_run(run_a)
    inv = R.inventory(run_a, run.losses).set_index("file")
    assert list(inv.index) == ["ckpt_000180.pt", "ckpt_000240.pt", "ckpt_000240.pt.corrupt", "ckpt_000300.pt",
                               "ckpt_000310.pt", "ckpt_000360.pt", "ckpt_000400.pt"]
    status = inv["status"].to_dict()
    for f in ("ckpt_000180.pt", "ckpt_000240.pt", "ckpt_000300.pt", "ckpt_000310.pt"):
        assert status[f] == "ok"
    assert status["ckpt_000240.pt.corrupt"].startswith("corrupt: ")
    assert status["ckpt_000400.pt"].startswith("corrupt: ")
    assert status["ckpt_000360.pt"] == "refused: pickled objects"
    assert inv.index[inv["resume_pick"]].tolist() == ["ckpt_000310.pt"]
    assert inv.loc["ckpt_000310.pt", "loss_step"] == 300  # nearest logged step <= 310
    assert inv.loc["ckpt_000310.pt", "loss_near"] == pytest.approx(loss_at(300) + 1e-6)
    assert inv.loc["ckpt_000180.pt", "loss_near"] == pytest.approx(loss_at(180) + 1e-6)
    assert inv.loc["ckpt_000180.pt", "time_source"] == "mtime"
    assert inv.loc["ckpt_000300.pt", "time_source"] == "checkpoint"
    assert inv.loc["ckpt_000300.pt", "time_written"] == datetime.fromtimestamp(T1 + 65.5).isoformat(timespec="seconds")
    assert inv.loc["ckpt_000300.pt", "has_ema"] and inv.loc["ckpt_000300.pt", "has_optimizer"]
    assert inv.loc["ckpt_000360.pt", "has_ema"] is None
    assert inv.loc["ckpt_000300.pt", "size_mb"] > 0
    assert not sentinel.exists()  # the pickle bomb was refused, never unpickled
    assert snapshot(run_a) == before  # nothing renamed (load_latest would quarantine the broken ones)


def test_inventory_resume_pick_skips_everything_broken(tmp_path):
    write_truncated(tmp_path / "ckpt_000100.pt", 100)
    save_checkpoint(ckpt_state(50), tmp_path / "ckpt_000050.pt.corrupt")  # loads, but quarantined: never picked
    inv = R.inventory(tmp_path, None)
    assert inv["status"].tolist() == ["ok (quarantined)", inv["status"].iloc[1]]
    assert inv["status"].iloc[1].startswith("corrupt") and not inv["resume_pick"].any()
    assert R.inventory(tmp_path, None, load=False)["status"].eq("not checked").all()
    assert R.inventory(tmp_path / "sub" if (tmp_path / "sub").mkdir() is None else None, None).empty


def test_loss_near_uses_the_record_logged_before_the_checkpoint(run_a):
    L = R.load_run(run_a).losses
    # a checkpoint at 220 written during segment 0 gets segment 0's loss, one written later gets segment 1's
    assert R._loss_near(L, 220, step_time(T0, None, 220) + 0.5)[1] == pytest.approx(loss_at(220, 0) + 1e-6)
    assert R._loss_near(L, 220, step_time(T1, 180, 220) + 0.5)[1] == pytest.approx(loss_at(220, 1) + 1e-6)
    assert R._loss_near(L, 10, None) == (None, None)


# ------------------------------------------------------------------------------------ report end to end
def test_main_writes_report_and_touches_nothing_else(run_a):
    before = snapshot(run_a)
    assert R.main([str(run_a)]) == 0
    rep = run_a / "report"
    for name in ("loss.png", "throughput.png", "eval.png"):
        w, h = image_size(rep / name)
        assert w > 300 and h > 300, name
    assert snapshot(run_a) == before
    assert sorted(p.name for p in run_a.iterdir() if p.name.startswith("ckpt_")) == sorted(
        k for k in before if k.startswith("ckpt_"))

    csv = pd.read_csv(rep / "checkpoints.csv")
    assert csv.columns.tolist() == R.INVENTORY_COLUMNS and len(csv) == 7
    assert csv.loc[csv["resume_pick"], "file"].tolist() == ["ckpt_000310.pt"]
    assert "| ckpt_000360.pt | 360 |" in (rep / "checkpoints.md").read_text()

    text = (rep / "summary.md").read_text()
    L = R.load_run(run_a).losses
    assert "steps done: 400 of 1000 (40%)" in text
    assert f"wall time: 4m 05s ({WALL:.0f} s)" in text and "3 process segment(s)" in text
    assert "restarts: 2 (resumed at step 180, 310); 60 step(s) computed again" in text
    best = L.loc[L["loss"].idxmin()]
    assert f"best loss: {R._g(best['loss'])} at step {int(best['step'])}" in text
    assert f"last loss: {R._g(loss_at(400) + 1e-6)} at step 400" in text
    eff = R.effective(L)
    span = R.auto_smooth(len(eff))
    ema = R.smooth(eff["loss"], span).iloc[-1]
    assert f"EMA over {span} points: {R._g(ema)})" in text
    assert f"mean clips/s: {R._g(L['clips_per_s'].mean(), 3)}" in text
    assert R._g(L["clips_per_s"].mean(), 3) == "4.696"
    assert "[preview_step000400.png](../samples/preview_step000400.png)" in text
    assert "## Duplicated steps" in text and "1 of 3 repeat(s) disagree" in text
    a, b = loss_at(220, 0) + 1e-6, loss_at(220, 1) + 1e-6
    assert f"| 220 | 1 | {R._g(a)} | {R._g(b)} | {R._g(b - a)} | no | 0 | 1 |" in text
    assert "| ckpt_000310.pt | 310 |" in text and "refused: pickled objects" in text
    assert "| 400 | 0.25 | 700.5 | 64 | eval/step_000400.json |" in text
    assert "![eval](eval.png)" in text and "![loss](loss.png)" in text
    assert "truncated" in text  # the note about metrics.jsonl's last line


def test_two_runs_overlay(tmp_path):
    a = make_run(tmp_path, "run_a", ckpts=False)
    b = make_run(tmp_path, "run_b", metrics=False, ckpts=False, scale=1.3)
    out = tmp_path / "cmp"
    assert R.main([str(a), str(b), "--out", str(out), "--log-scale", "--smooth", "5"]) == 0
    w, h = image_size(out / "loss_overlay.png")
    assert w > 300 and h > 300
    for d in (a, b):
        assert (d / "report" / "summary.md").is_file() and (d / "report" / "loss.png").is_file()
    cmp_md = (out / "compare.md").read_text()
    assert "| run_a | 400 |" in cmp_md and "| run_b | 400 |" in cmp_md
    assert "EMA over 5 points" in (b / "report" / "summary.md").read_text()
    assert not (a / "report" / "loss_overlay.png").exists()


def test_empty_and_missing_run_folders(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "job_config.yaml").write_text("train: {}\n")  # a submitted job that has not started yet
    assert R.main([str(empty)]) == 2
    assert f"report: {empty}: no metrics.jsonl and no train.log or slurm-*.out: nothing to report" in \
        capsys.readouterr().err
    assert not (empty / "report").exists()  # nothing written
    started = tmp_path / "started"
    started.mkdir()
    (started / "train.log").write_text("Out: x | Device: cpu\n")  # training started, no step logged yet
    assert R.main([str(started)]) == 0
    assert image_size(started / "report" / "loss.png")[0] > 300
    assert "steps done: 0" in (started / "report" / "summary.md").read_text()
    assert R.main([str(tmp_path / "missing")]) == 2


def test_plot_functions_directly(run_a, tmp_path):
    run = R.load_run(run_a)
    p = R.plot_loss([run], tmp_path / "l.png", log_scale=True, smooth_span=3)
    t = R.plot_throughput(run, tmp_path / "t.png")
    assert min(image_size(p)) > 300 and min(image_size(t)) > 300


# ------------------------------------------------------------------------------------------- no torch
def _py(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_log_part_does_not_import_torch(run_a, tmp_path):
    code = f"""
import sys
from pathlib import Path
import tools.report as r
df = r.parse_log(["step 000020 | loss 0.1234", "junk"])
assert df['step'].tolist() == [20], df
run = r.load_run({str(run_a)!r})
out = Path({str(tmp_path / 'o')!r}); out.mkdir()
r.plot_loss([run], out / 'loss.png'); r.plot_throughput(run, out / 'tp.png'); r.write_summary(run, out)
assert 'torch' not in sys.modules, 'torch imported'
print('ok')
"""
    p = _py(code)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr


def test_report_without_torch_lists_checkpoints_unchecked(run_a, tmp_path):
    code = f"""
import sys
sys.modules['torch'] = None  # as on a login node without torch
import tools.report as r
assert r.main([{str(run_a)!r}]) == 0
import pandas as pd
inv = pd.read_csv({str(run_a / 'report' / 'checkpoints.csv')!r})
assert set(inv['status']) == {{'not checked (no torch)'}}, inv['status']
assert not inv['resume_pick'].any()
print('ok')
"""
    p = _py(code)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr


def test_cli_script(run_a, tmp_path):
    b = make_run(tmp_path, "run_b", metrics=False, ckpts=False)
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(run_a), str(b), "--smooth", "3"],
                       cwd=run_a.parent, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (run_a / "report" / "summary.md").is_file() and (b / "report" / "summary.md").is_file()
    assert (run_a / "report" / "loss_overlay.png").is_file()  # several runs, no --out: the first run's report
    inv = pd.read_csv(run_a / "report" / "checkpoints.csv")  # the script found t2v.checkpoint and loaded them
    assert inv.loc[inv["resume_pick"], "file"].tolist() == ["ckpt_000310.pt"]


# ------------------------------------------------------------------------------------ the real trainer
@pytest.mark.slow
def test_report_on_a_real_requeued_training_run(tmp_path, monkeypatch):
    """The contract end to end: t2v.train stopped twice (the second resume falls back past a truncated
    checkpoint), then the report reads what it wrote."""
    runs = pytest.importorskip("runs")  # tests/runs.py: demo data + tiny config
    T = pytest.importorskip("t2v.train")
    out = tmp_path / "run"
    cfg = runs.tiny_config(tmp_path / "data", out)
    runs.prepare(cfg)
    assert T.train(cfg, stop_at=25) != 0
    write_truncated(out / "ckpt_000025.pt", 25)  # the newest checkpoint is broken: resume goes back to 20
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert T.train(cfg, stop_at=35) != 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert T.train(cfg) == 0
    before = snapshot(out)
    assert R.main([str(out)]) == 0
    assert snapshot(out) == before
    run = R.load_run(out)
    steps = cfg.train.steps
    assert run.losses["step"].max() == steps and (run.losses["source"] == "metrics").all()
    assert run.resumes["step"].tolist() == [20, 35] and run.resumes["restart"].tolist() == [1, 2]
    dup = run.duplicates
    assert dup["step"].tolist() == [25] and dup["agree"].all()  # resume is exact: same loss both times
    log = R.parse_log((out / "train.log").read_text().splitlines())
    assert log["step"].tolist() == run.losses["step"].tolist()
    assert np.allclose(log["loss"], run.losses["loss"], atol=6e-5)
    inv = pd.read_csv(out / "report" / "checkpoints.csv")
    assert inv.loc[inv["file"] == "ckpt_000025.pt.corrupt", "status"].str.startswith("corrupt").all()
    assert inv.loc[inv["resume_pick"], "file"].tolist() == [f"ckpt_{steps:06d}.pt"]
    text = (out / "report" / "summary.md").read_text()
    assert f"steps done: {steps} of {steps} (100%)" in text and "restarts: 2 (resumed at step 20, 35)" in text


# ------------------------------------------------------------------------- validation loss, demo check
def test_validation_loss_and_demo_check_in_the_report(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "loss": 0.5, "time": T0 + s, "restart": 0} for s in (10, 20, 30)]
    val = lambda s, k: {"step": s, "event": "val", "time": T0 + s, "restart": 0, "val_loss": 0.3 * k,  # noqa: E731
                        "val_loss_t900": 0.5 * k, "val_loss_t100": 0.1 * k}
    # step 20 measured twice (a resume from an older checkpoint): the later figure counts
    lines = [json.dumps(r) for r in recs[:2]] + [json.dumps(val(20, 1.0)), json.dumps(val(10, 1.2)),
                                                   json.dumps(val(20, 0.9)), json.dumps(recs[2]), '{"step": 3']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "eval").mkdir()
    (run / "eval" / "demo_check.json").write_text(json.dumps(
        {"step": 30, "num": 48, "ddim_steps": 25, "guidance": 5.0, "color": 1.0, "shape": 0.8541, "motion": 0.979,
         "all": 0.83, "background": 0.055}))
    r = R.load_run(run)
    assert list(r.val.columns) == ["step", "val_loss", "val_loss_t100", "val_loss_t900"]  # timesteps in order
    assert r.val["step"].tolist() == [10, 20] and r.val["val_loss_t900"].tolist() == pytest.approx([0.6, 0.45])
    assert len(r.losses) == 3  # val records are not loss records
    assert R.main([str(run), "--no-load"]) == 0
    assert min(image_size(run / "report" / "val.png")) > 300
    summary = (run / "report" / "summary.md").read_text()
    assert "## Validation loss" in summary and "![val](val.png)" in summary
    demo = summary.split("## Demo check")[1].split("##")[0]
    assert "Step 30: 48 prompts sampled (DDIM 25" in demo and "0.8541" in demo and "0.979" in demo and "0.055" in demo
    # tools/demo_check.py --samples 3 (a flow model): every prompt three times, its sampler named
    pooled = {"step": 30, "num": 144, "seeds": [0, 1, 2], "sampler": "Euler", "ddim_steps": 25, "guidance": 2.5,
              "color": 1.0, "shape": 0.9583, "motion": 1.0, "all": 0.95, "background": 0.03}
    (run / "eval" / "demo_check.json").write_text(json.dumps(pooled))
    assert R.main([str(run), "--no-load"]) == 0
    demo = (run / "report" / "summary.md").read_text().split("## Demo check")[1].split("##")[0]
    assert "Step 30: 48 prompts x 3 sampling seeds sampled (Euler 25, guidance 2.5)" in demo and "0.9583" in demo


# --------------------------------------------------------------------------- run facts from t2v.runlog events
def test_run_facts_come_from_metrics_events(tmp_path):
    """With metrics.jsonl the events are its own (read once, through t2v.runlog): the log's prose is not
    counted again; preview failures are counted from `preview_failed` events and shown in the summary."""
    from t2v import runlog
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"event": runlog.START, "step": 0, "time": T0, "restart": 0}]
    for s in (10, 20, 30):
        recs.append({"step": s, "loss": 1.0 / s, "time": T0 + s, "restart": 0})
        if s < 30:
            recs.append({"event": runlog.PREVIEW_FAILED, "step": s, "time": T0 + s, "restart": 0, "error": "E: x"})
    recs.append({"event": runlog.CHECKPOINT, "step": 30, "time": T0 + 31, "restart": 0, "path": str(run / "c")})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:3]) + "\n[1]\n"
                                       + "\n".join(json.dumps(r) for r in recs[3:]) + '\n{"step": 4')
    skipped: list = []
    assert len(runlog.read_records(run, skipped)) == len(recs) and skipped == [(4, False), (len(recs) + 2, True)]
    (run / "train.log").write_text("Out: x | Device: cpu\n" + "".join(
        f"step {s:06d} | loss {1 / s:.4f}\nwarning: preview at step {s} failed and was skipped: E: x\n"
        for s in (10, 20, 30)) + f"saved {run}/ckpt_000030.pt\n")
    r = R.load_run(run)
    assert (r.events["source"] == "metrics").all() and r.count(runlog.CHECKPOINT) == 1
    assert r.count(runlog.PREVIEW_FAILED) == 2
    assert any("truncated" in n for n in r.notes) and any("1 unreadable line(s)" in n for n in r.notes)
    assert R.main([str(run), "--no-load"]) == 0
    assert "- preview failures: 2 (see train.log warnings)" in (run / "report" / "summary.md").read_text()
    (run / "metrics.jsonl").unlink()  # the text log alone: no preview-failure count is made up from its prose
    assert R.main([str(run), "--no-load"]) == 0
    assert "preview failures" not in (run / "report" / "summary.md").read_text()
