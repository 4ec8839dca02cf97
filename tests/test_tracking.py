"""TensorBoard and W&B (t2v/tracking.py): the records metrics.jsonl gets, read back with each one's own reader
(TensorBoard's EventAccumulator, `wandb leet inspect`); a resumed run shows every step once, in order, after a
kill -9 too, and a W&B run is one run across requeues."""
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
from t2v import tracking
from t2v.tracking import TensorBoard


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def inspect_records(run_dir):
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


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


def last_of_each_step(run, key="loss"):
    """metrics.jsonl's last record of each step: what the process that went on from there logged."""
    return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if key in r}


@pytest.mark.slow
def test_a_killed_and_resumed_run_shows_every_step_once_in_order(tmp_path):
    d, run = tmp_path / "data", tmp_path / "run"
    cfg = tiny_config(d, run)
    prepare(cfg)
    cmd = [sys.executable, "-m", "t2v.train", "--config", str(REPO / "configs/tiny.yaml"),
           f"data.manifest={d / 'train.jsonl'}", f"data.cache_dir={d / 'cache'}", f"text.cache_dir={d / 'cache'}",
           f"train.outdir={run}", "train.steps=40", "train.log_every=1", "train.ckpt_every=10", "train.val_every=20",
           "train.sample_every=20", "train.wandb=offline"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 000025"):
            break
    # Frozen after its checkpoint at 20, with steps 21-25 already logged, until W&B's service (a process of its own)
    # has written its first block: a fast host reaches step 25 before the first flush (FLUSH_S), which would leave
    # the killed file empty and the config check below with nothing to read (the cut-buffer case has its own test).
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 60
    try:
        while not any(r["type"] == "run" for d in (run / "wandb").glob("offline-run-*") for r in inspect_records(d)):
            assert time.monotonic() < deadline, "W&B never wrote the first process's run record"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)  # a stopped process is not left behind, even when the wait fails
        proc.wait()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout

    acc = read_events(run / "tensorboard")
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 41))  # each step once, in order
    # the values are the ones the resumed run logged, i.e. metrics.jsonl's last record of each step
    last = last_of_each_step(run)
    assert [e.value for e in loss] == pytest.approx([last[s] for s in range(1, 41)], rel=1e-6)
    assert steps_of(acc, "val/val_loss") == [20, 40]
    assert [i.step for i in acc.Images("preview")] == [20, 40]
    assert [e.value for e in acc.Scalars("run/restart")] == [0, 0]  # the start, then the resume (outside Slurm)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per process

    # W&B: one run id, an offline run dir per process; `wandb sync` uploads them in this order
    run_id = (run / tracking.RUN_ID_FILE).read_text().strip()
    dirs = tracking.offline_runs(run, run_id)
    assert len(dirs) == 2, sorted((run / "wandb").iterdir())
    rows = [row for d in dirs for row in tracking.wandb_history(d)]
    steps = [row["_step"] for row in rows]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 40, steps  # each once, rising (0: the start)
    losses = {row["_step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert sorted(losses) == list(range(1, 41))
    assert [losses[s] for s in range(1, 41)] == pytest.approx([last[s] for s in range(1, 41)], rel=1e-6)
    val = last_of_each_step(run, "val_loss")
    assert {row["_step"]: row["val/val_loss"] for row in rows if "val/val_loss" in row} == pytest.approx(val)
    assert [row["_step"] for row in rows if "preview.path" in row] == [20, 40]
    for d in dirs:  # the config is in each process's first record, the killed one's too (wandb/wandb#6952)
        first = inspect_records(d)[1]
        assert first["type"] == "run" and first["run"]["run_id"] == run_id
        assert first["run"]["config"]["update"]["train"]["steps"] == 40


def test_steps_a_kill_cut_from_the_wandb_file_are_sent_again_from_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = runlog.RunLog(tmp_path)
    first = tracking.WandB(tmp_path, "offline", "p", None, {"train": {"steps": 40}}, log)
    for step in range(1, 26):  # the killed process logged 1-25 to metrics.jsonl ...
        log.metrics(step=step, loss=1.0 / step)
        if step <= 10:  # ... but its W&B file got only 1-10 before the kill
            first.record({"step": step, "loss": 1.0 / step})
    first.close()
    again = tracking.WandB(tmp_path, "offline", "p", 20, {"train": {"steps": 40}}, log)
    assert again.held == 10
    for step in range(21, 41):  # the process resumed from its checkpoint at 20
        again.record({"step": step, "loss": 2.0 / step})
    again.close()
    log.close()
    rows = [row for d in tracking.offline_runs(tmp_path, first.run_id) for row in tracking.wandb_history(d)]
    # 11-20 from metrics.jsonl, 21-40 from the resumed run: the killed process's 21-25 are not sent
    assert [r["_step"] for r in rows] == list(range(1, 41))
    assert [r["train/loss"] for r in rows] == pytest.approx([1.0 / s for s in range(1, 21)] +
                                                            [2.0 / s for s in range(21, 41)])


def test_without_the_tensorboard_package_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    with pytest.raises(runlog.TrainingError, match=r"train.tensorboard=true needs the tensorboard package .*; pip "
                                                   r"install tensorboard, or set train.tensorboard=false"):
        TensorBoard(tmp_path)


def test_wandb_continues_one_run_and_skips_the_steps_it_already_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = runlog.RunLog(tmp_path)
    first = tracking.WandB(tmp_path, "offline", "p", None, {"train": {"steps": 40}}, log)
    for step in range(1, 31):  # an earlier process got to step 30, past its checkpoint at 20
        first.record({"step": step, "loss": 1.0 / step})
    first.close()
    again = tracking.WandB(tmp_path, "offline", "p", 20, {"train": {"steps": 40}}, log)
    assert again.run_id == first.run_id and again.held == 30
    for step in range(21, 41):  # the resumed process logs 21-40 again; W&B already has 21-30
        again.record({"step": step, "loss": 1.0 / step})
    again.close()
    log.close()
    dirs = tracking.offline_runs(tmp_path, first.run_id)
    rows = [row for d in dirs for row in tracking.wandb_history(d)]
    assert [r["_step"] for r in rows] == list(range(1, 41))
    assert [r["train/loss"] for r in rows] == pytest.approx([1.0 / s for s in range(1, 41)])
    text = (tmp_path / "train.log").read_text()
    assert text.count(f"W&B run {first.run_id} (p): offline in {tmp_path / 'wandb'}/offline-run-") == 2
    assert f"wandb sync {tmp_path / 'wandb'}/offline-run-*" in text


def test_wandb_online_without_network_warns_and_logs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: as a compute node's firewall
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    import wandb

    wandb.teardown()  # W&B's service from the tests before read the environment without this server: a fresh one
    log = runlog.RunLog(tmp_path)
    w = tracking.WandB(tmp_path, "online", "p", None, {}, log)
    w.record({"step": 1, "loss": 0.5})
    w.close()
    log.close()
    text = (tmp_path / "train.log").read_text()
    assert "warning: train.wandb=online could not start a W&B run (" in text, text
    assert f"logging offline to {tmp_path / 'wandb'} instead" in text
    rows = tracking.wandb_history(tracking.offline_runs(tmp_path, w.run_id)[0])
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(1, 0.5)]


def test_without_the_wandb_package_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(runlog.TrainingError, match=r"train.wandb=offline needs the wandb package .*pip install "
                                                   r"'wandb>=0.31' \(or pip install -e '.\[wandb\]'\), or set "
                                                   r"train.wandb=off"):
        tracking.WandB(tmp_path, "offline", "p", None, {}, runlog.RunLog(tmp_path, enabled=False))
    assert not (tmp_path / tracking.RUN_ID_FILE).exists()


def test_a_cut_wandb_file_reads_up_to_the_cut(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    w = tracking.WandB(tmp_path, "offline", "p", None, {}, runlog.RunLog(tmp_path, enabled=False))
    for step in range(1, 201):
        w.record({"step": step, "loss": float(step)})
    w.close()
    (f,) = tracking.offline_runs(tmp_path, w.run_id)[0].glob("*.wandb")
    whole = [r["_step"] for r in tracking.wandb_history(f.parent)]
    assert sorted(whole) == list(range(1, 201))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # what a kill mid-write leaves
    steps = [r["_step"] for r in tracking.wandb_history(f.parent)]
    # the records before the cut, in the file's order: on a loaded CI host the first half of the file once held
    # steps 1-56 and 117-200, so W&B does not always write steps in order; `held` takes the largest it reads
    assert 0 < len(steps) < 200 and steps == whole[: len(steps)]


@pytest.mark.parametrize("value, shown", [("sometimes", "'sometimes'"), ("true", "'on'")])  # YAML true: on
def test_a_bad_wandb_mode_names_the_key(value, shown):
    from t2v import config as C

    with pytest.raises(C.ConfigError, match=f"train.wandb must be one of off, offline, online, got {shown}"):
        C.load_config(None, [f"train.wandb={value}"], env={})
    assert C.load_config(None, ["train.wandb=off"], env={}).train.wandb == "off"  # YAML's off is the word
