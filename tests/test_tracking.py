"""TensorBoard (t2v/tracking.py): the records metrics.jsonl gets, read back with TensorBoard's own reader; a
resumed run's event files show every step once, in order, after a kill -9 too."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from runs import REPO, prepare, tiny_config
from t2v import runlog
from t2v.tracking import TensorBoard


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps_of(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def test_every_record_becomes_a_scalar_text_or_image(tmp_path):
    import matplotlib.image

    log = runlog.RunLog(tmp_path, restart=0)
    log.add_sink(TensorBoard(tmp_path / "tensorboard", None, "train:\n  steps: 4\n"))
    log.event(runlog.START, 0, world_size=1, nodes=["vm"])
    for step in range(1, 5):
        log.metrics(step=step, loss=1.0 / step, lr=1e-3, grad_norm=0.5, clips_per_s=10.0, step_time=0.1)
    log.event(runlog.VAL, 4, val_loss=0.25, val_loss_t100=0.5)
    grid = tmp_path / "preview_step000004.png"
    matplotlib.image.imsave(grid, np.linspace(0, 1, 8 * 12 * 3).reshape(8, 12, 3))
    log.image("preview", grid, 4)
    log.close()

    acc = read_events(tmp_path / "tensorboard")
    assert steps_of(acc, "train/loss") == [1, 2, 3, 4]
    assert [round(e.value, 6) for e in acc.Scalars("train/loss")] == [1.0, 0.5, round(1 / 3, 6), 0.25]
    for tag in ("train/lr", "train/grad_norm", "train/clips_per_s", "train/step_time", "val/val_loss",
                "val/val_loss_t100", "run/restart"):
        assert tag in acc.Tags()["scalars"], tag
    image, = acc.Images("preview")
    assert (image.step, image.width, image.height) == (4, 12, 8)
    texts = {t: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(t)] for t in acc.Tags()["tensors"]}
    assert any("steps: 4" in x for x in texts["config/text_summary"])
    assert texts["run/events/text_summary"] == ["start at step 0 (world_size=1, nodes=['vm'], restart=0)"]


def test_a_resumed_writer_hides_the_steps_logged_after_the_checkpoint_and_a_cut_file_reads(tmp_path):
    first = TensorBoard(tmp_path)
    for step in range(1, 11):  # the first process logged steps 1-10, saved at 5, then was killed
        first.record({"step": step, "loss": 1.0})
    first.writer.flush()  # (no close: a killed process never closes)
    killed, = tmp_path.glob("events.out.tfevents.*")
    killed.write_bytes(killed.read_bytes()[:-7])  # and its last record is half-written: step 10 is lost
    second = TensorBoard(tmp_path, resumed_at=5)
    for step in range(6, 13):
        second.record({"step": step, "loss": 2.0})
    second.close()
    loss = read_events(tmp_path).Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 13))
    assert [e.value for e in loss] == [1.0] * 5 + [2.0] * 7  # steps 6-10 as the resumed run logged them


def test_train_tensorboard_off_writes_no_event_files(tmp_path):
    from t2v.train import train

    d = tmp_path / "data"
    cfg = tiny_config(d, tmp_path / "run", "train.steps=2", "train.tensorboard=false")
    prepare(cfg, n_train=8)
    assert train(cfg) == 0
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.slow
def test_a_killed_and_resumed_run_shows_every_step_once_in_order(tmp_path):
    d, run = tmp_path / "data", tmp_path / "run"
    cfg = tiny_config(d, run)
    prepare(cfg)
    cmd = [sys.executable, "-m", "t2v.train", "--config", str(REPO / "configs/tiny.yaml"),
           f"data.manifest={d / 'train.jsonl'}", f"data.cache_dir={d / 'cache'}", f"text.cache_dir={d / 'cache'}",
           f"train.outdir={run}", "train.steps=40", "train.log_every=1", "train.ckpt_every=10", "train.val_every=20",
           "train.sample_every=20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 000025"):
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)  # after its checkpoint at 20, with steps 21-25 already logged
    proc.wait()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout

    acc = read_events(run / "tensorboard")
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 41))  # each step once, in order
    # the values are the ones the resumed run logged, i.e. metrics.jsonl's last record of each step
    last = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "event" not in r}
    assert [e.value for e in loss] == pytest.approx([last[s] for s in range(1, 41)], rel=1e-6)
    assert steps_of(acc, "val/val_loss") == [20, 40]
    assert [i.step for i in acc.Images("preview")] == [20, 40]
    assert [e.value for e in acc.Scalars("run/restart")] == [0, 0]  # the start, then the resume (outside Slurm)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per process


def test_without_the_tensorboard_package_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    with pytest.raises(runlog.TrainingError, match=r"train.tensorboard=true needs the tensorboard package .*; pip "
                                                   r"install tensorboard, or set train.tensorboard=false"):
        TensorBoard(tmp_path)
