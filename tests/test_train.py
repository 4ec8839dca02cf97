"""Training core: loss goes down, resume is bit-exact, signals save and ask for a requeue, bad checkpoints."""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runs import REPO, assert_states_equal, load, prepare, tiny_config
from t2v import checkpoint as ckpt
from t2v import config as C
from t2v import runlog as R
from t2v import train as T
from t2v.step import lr_at
from t2v.train import REQUEUE_EXIT, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    prepare(tiny_config(d, d / "unused"))
    return d


def log_lines(outdir: Path, prefix: str) -> list[str]:
    return [l for l in (outdir / "train.log").read_text().splitlines() if l.startswith(prefix)]


def test_loss_decreases_and_files_are_written(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", "train.steps=60", "train.log_every=5", "train.ckpt_every=20")
    assert train(cfg) == 0
    losses = [float(l.split("loss ")[1]) for l in log_lines(tmp_path / "run", "step ")]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:2]) / 2, losses  # a real drop, not noise
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "run")] == [
        "ckpt_000020.pt", "ckpt_000040.pt", "ckpt_000060.pt"]
    state = load(tmp_path / "run" / "ckpt_000060.pt")
    assert state["step"] == 60 and state["config"]["train"]["steps"] == 60
    assert {"model", "ema", "optimizer", "scaler", "rng", "data", "config"} <= state.keys()
    assert (tmp_path / "run" / "config.yaml").is_file()
    # starting again on a finished run does nothing and says so
    assert train(cfg) == 0
    assert "nothing to do" in (tmp_path / "run" / "train.log").read_text()


# the field's recipe (docs/recipe.md): rectified flow, the video transformer, and both
RECIPES = {"flow": ("diffusion.objective=flow", "diffusion.shift=3"),
           "dit": ("model.arch=dit", "diffusion.prediction=v"),
           "dit_flow": ("model.arch=dit", "diffusion.objective=flow", "model.size=small", "model.checkpointing=true")}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_resumes_bit_exact_and_samples(data_dir, tmp_path, recipe):
    args = ("train.steps=12", "train.ckpt_every=5", "train.log_every=1", "train.val_every=6", "train.sample_every=6",
            "train.grad_accum=2", *RECIPES[recipe])
    assert train(tiny_config(data_dir, tmp_path / "straight", *args)) == 0
    assert train(tiny_config(data_dir, tmp_path / "resumed", *args), stop_at=7) == REQUEUE_EXIT
    assert train(tiny_config(data_dir, tmp_path / "resumed", *args)) == 0
    assert_states_equal(load(tmp_path / "straight" / "ckpt_000012.pt"), load(tmp_path / "resumed" / "ckpt_000012.pt"))
    assert log_lines(tmp_path / "straight", "val step") == log_lines(tmp_path / "resumed", "val step")
    losses = [float(l.split("loss ")[1]) for l in log_lines(tmp_path / "straight", "step ")]
    assert all(math.isfinite(v) for v in losses) and len(losses) == 12
    assert (tmp_path / "straight" / "samples" / "preview_step000012.png").is_file()
    from t2v.sample import main as sample_main

    objective = "flow" if "diffusion.objective=flow" in RECIPES[recipe] else "ddpm"
    default, other = ("euler", "heun") if objective == "flow" else ("ddim", "ddpm")
    out = tmp_path / "samples"
    assert sample_main(["--ckpt", str(tmp_path / "straight"), "--prompt", "a red circle", "--steps", "3",
                        "--out", str(out)]) == 0
    assert (out / "grid.png").is_file() and (out / "a_red_circle.gif").is_file()
    if objective == "flow":
        assert sample_main(["--ckpt", str(tmp_path / "straight"), "--prompt", "a red circle", "--steps", "2",
                            "--method", other, "--out", str(out / other)]) == 0
        assert sample_main(["--ckpt", str(tmp_path / "straight"), "--prompt", "a", "--method", "ddim"]) == 2


def test_sampling_a_flow_model_with_a_ddpm_sampler_says_which_it_takes(data_dir, tmp_path, capsys):
    assert train(tiny_config(data_dir, tmp_path, "train.steps=2", "train.val_every=0",
                             "diffusion.objective=flow")) == 0
    from t2v.sample import main as sample_main

    assert sample_main(["--ckpt", str(tmp_path), "--prompt", "a", "--method", "ddpm"]) == 2
    assert "was trained with diffusion.objective=flow, which samples with euler or heun" in capsys.readouterr().err


def test_keep_last_k(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, "train.steps=50", "train.ckpt_every=10", "train.keep_last=2")
    train(cfg)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [40, 50]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_exact(data_dir, tmp_path, workers):
    steps = 30
    stop = random.Random(workers).randint(1, steps - 1)  # any step, including one between checkpoints
    args = (f"train.steps={steps}", "train.ckpt_every=7", "train.log_every=1", f"data.num_workers={workers}",
            "diffusion.cond_dropout=0.3")
    straight = tiny_config(data_dir, tmp_path / "straight", *args)
    assert train(straight) == 0
    resumed = tiny_config(data_dir, tmp_path / "resumed", *args)
    assert train(resumed, stop_at=stop) == REQUEUE_EXIT
    assert ckpt.list_checkpoints(tmp_path / "resumed")[-1][0] == stop
    assert train(resumed) == 0
    assert_states_equal(load(tmp_path / "straight" / f"ckpt_{steps:06d}.pt"),
                        load(tmp_path / "resumed" / f"ckpt_{steps:06d}.pt"))
    # the same loss lines, and the resume is in the log
    assert log_lines(tmp_path / "straight", "step ") == log_lines(tmp_path / "resumed", "step ")
    assert log_lines(tmp_path / "resumed", "resumed from") == [
        f"resumed from {tmp_path / 'resumed' / f'ckpt_{stop:06d}.pt'} at step {stop} (restart 0)"]


def _start(cfg_args, outdir, data_dir):
    cmd = [sys.executable, "-m", "t2v.train", "--config", str(REPO / "configs/tiny.yaml"),
           f"data.manifest={data_dir / 'train.jsonl'}", f"data.cache_dir={data_dir / 'cache'}",
           f"text.cache_dir={data_dir / 'cache'}", f"train.outdir={outdir}", *cfg_args]
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "OUTDIR", "STEPS")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)


def _wait_for_step(proc, n=1):
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step ") and len([s for s in seen if s.startswith("step ")]) >= n:
            return seen
    raise AssertionError("training ended before logging a step:\n" + "".join(seen))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])
def test_signal_saves_and_exits_for_requeue(data_dir, tmp_path, sig):
    proc = _start(["train.steps=100000", "train.log_every=1", "train.ckpt_every=100000"], tmp_path, data_dir)
    _wait_for_step(proc, 3)
    proc.send_signal(sig)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == REQUEUE_EXIT, out
    (step, path), = ckpt.list_checkpoints(tmp_path)
    assert f"signal {sig.name} at step {step}" in out and f"saved {path}" in out
    assert ckpt.load_checkpoint(path)["step"] == step


def test_second_signal_during_save_does_not_corrupt(data_dir, tmp_path):
    # A bigger model makes the save last long enough to be hit by the second and third signal.
    proc = _start(["train.steps=100000", "train.log_every=1", "train.ckpt_every=100000", "model.size=base",
                   "data.size=16", "data.frames=4"], tmp_path, data_dir)
    _wait_for_step(proc, 1)
    proc.send_signal(signal.SIGUSR1)
    for _ in range(20):
        time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == REQUEUE_EXIT, out
    (step, path), = ckpt.list_checkpoints(tmp_path)
    assert ckpt.load_checkpoint(path)["step"] == step
    assert not list(tmp_path.glob(".ckpt_*tmp*"))


def test_corrupt_newest_checkpoint_falls_back(data_dir, tmp_path, capsys):
    cfg = tiny_config(data_dir, tmp_path, "train.steps=20", "train.ckpt_every=10")
    train(cfg)
    newest = tmp_path / "ckpt_000020.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a node dying mid-copy
    cfg.train.steps = 30
    assert train(cfg) == 0
    log = (tmp_path / "train.log").read_text()
    assert f"resumed from {tmp_path / 'ckpt_000010.pt'} at step 10" in log
    assert (tmp_path / "ckpt_000020.pt.corrupt").is_file()  # kept for inspection, never deleted
    assert ckpt.load_checkpoint(tmp_path / "ckpt_000030.pt")["step"] == 30


class Bomb:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/t2v_pwned",))


def test_pickle_bomb_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt_000010.pt"
    torch.save({"step": 10, "model": {}, "payload": Bomb()}, path)
    with pytest.raises(ckpt.CheckpointError, match="refused") as e:
        ckpt.load_checkpoint(path)
    assert not Path("/tmp/t2v_pwned").exists()
    # the message says what was refused, and never advises loading the file with weights_only=False
    assert "GLOBAL posix.system" in str(e.value) and "weights_only" not in str(e.value)
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ckpt.CheckpointError, match="corrupt") as e:
        ckpt.load_checkpoint(path)
    assert "weights_only" not in str(e.value)


def test_nan_losses_are_skipped_then_stop(data_dir, tmp_path, monkeypatch):
    from t2v import diffusion as D  # the step's loss, whichever objective

    real = D.training_loss
    calls = {"n": 0}

    def sometimes_nan(out, target, weight=None):
        calls["n"] += 1
        loss = real(out, target, weight)
        return loss * float("nan") if calls["n"] in (3, 4) or calls["n"] > 10 else loss

    monkeypatch.setattr(D, "training_loss", sometimes_nan)
    cfg = tiny_config(data_dir, tmp_path, "train.steps=10", "train.max_nan_steps=3")
    assert train(cfg) == 0  # two NaN steps are skipped, training finishes
    assert (tmp_path / "train.log").read_text().count("non-finite loss") == 2
    state = load(tmp_path / "ckpt_000010.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    cfg2 = tiny_config(data_dir, tmp_path / "b", "train.steps=30", "train.max_nan_steps=3")
    calls["n"] = 0
    with pytest.raises(T.TrainingError, match="non-finite"):
        train(cfg2)


def test_missing_caption_embeddings_fail_with_the_command_to_run(data_dir, tmp_path):
    import t2v.train as T

    cfg = tiny_config(data_dir, tmp_path, f"text.cache_dir={tmp_path / 'empty'}")
    with pytest.raises(T.TrainingError, match="python -m t2v.text embed"):
        train(cfg)


def test_warmup_then_constant_lr():
    from t2v.config import TrainConfig

    c = TrainConfig(lr=1e-3, warmup=10)
    assert lr_at(0, c) == pytest.approx(1e-4) and lr_at(9, c) == pytest.approx(1e-3) and lr_at(500, c) == 1e-3


def test_lr_cooldown_falls_linearly_over_the_last_fraction():
    """train.lr_cooldown=0.2 of 100 steps: constant up to step 79, then falling every step towards 0, never 0."""
    from t2v.config import TrainConfig

    c = TrainConfig(lr=1e-3, warmup=10, steps=100, lr_cooldown=0.2)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[9:80] == [1e-3] * 71
    assert all(a > b > 0 for a, b in zip(lrs[79:], lrs[80:]))
    assert lrs[80] == pytest.approx(1e-3 * 20 / 21) and lrs[99] == pytest.approx(1e-3 / 21)


def test_attention_switches_train_and_sample(tmp_path):
    """Temporal attention and cross-attention on cached caption tokens run end to end (train, preview)."""
    data = tmp_path / "data"
    cfg = tiny_config(data, tmp_path / "run", "train.steps=4", "train.sample_every=4", "text.tokens=true",
                      "model.temporal_attention=true", "model.cross_attention=true")
    prepare(cfg)
    assert train(cfg) == 0
    assert (tmp_path / "run" / "samples" / "preview_step000004.png").is_file()
    no_tokens = tiny_config(data, tmp_path / "b", f"text.cache_dir={tmp_path / 'plain'}", "model.cross_attention=true")
    prepare(tiny_config(data, tmp_path / "b", f"text.cache_dir={tmp_path / 'plain'}"))
    import t2v.train as T

    with pytest.raises(T.TrainingError, match="text.tokens=true"):
        train(no_tokens)


def test_padded_and_string_captions_embed_and_train(data_dir, tmp_path):
    """`text embed` and training read captions with one normaliser: what one embeds the other finds."""
    import json

    from t2v import text

    rows = [json.loads(l) for l in (data_dir / "train.jsonl").read_text().splitlines()][:4]
    rows[0]["captions"] = [f"  {c} " for c in rows[0]["captions"]]  # padded
    rows[1]["captions"] = rows[1]["captions"][0] + "\t"  # one string, not a list
    rows[2] = {"video": rows[2]["video"], "caption": " " + rows[2]["captions"][0]}  # the single-caption key, padded
    for r in rows:
        r["video"] = str(data_dir / r["video"])
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"data.manifest={manifest}", f"data.cache_dir={tmp_path / 'cache'}", f"text.cache_dir={tmp_path / 'cache'}"]
    assert text.main(["embed", "--config", str(REPO / "configs/tiny.yaml"), "--no-progress", *args]) == 0
    cfg = tiny_config(data_dir, tmp_path / "run", *args, "train.steps=3", "train.val_every=0")
    assert train(cfg) == 0


@pytest.mark.parametrize("change", ["diffusion.prediction=v", "diffusion.shift=4", "data.size=24", "data.frames=2",
                                    "text.dim=32", "model.coords=true", "diffusion.timesteps=2000",
                                    "diffusion.objective=flow", "model.arch=dit"])
def test_resume_refuses_a_changed_run(data_dir, tmp_path, change):
    first = tiny_config(data_dir, tmp_path, "train.steps=4", "train.val_every=0")
    assert train(first) == 0
    again = tiny_config(data_dir, tmp_path, "train.steps=8", "train.val_every=0", change)
    with pytest.raises(T.TrainingError, match=re.escape(change.split("=")[0]) + ".*use a new OUTDIR"):
        train(again)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]  # nothing saved is touched


def test_allow_changes_lets_a_named_change_resume(data_dir, tmp_path):
    assert train(tiny_config(data_dir, tmp_path, "train.steps=4", "train.val_every=0")) == 0
    changed = ("train.steps=6", "train.val_every=0", "data.size=24", "diffusion.shift=2")
    with pytest.raises(T.TrainingError, match=r"\(diffusion.shift: 1.0 -> 2.0; data.size: 16 -> 24\)"):
        train(tiny_config(data_dir, tmp_path, *changed))
    with pytest.raises(T.TrainingError, match=r"\(diffusion.shift: 1.0 -> 2.0\)"):  # only the keys not named
        train(tiny_config(data_dir, tmp_path, *changed, "train.allow_changes=data.size"))
    assert train(tiny_config(data_dir, tmp_path, "train.steps=6", "train.val_every=0", "data.size=24",
                             "train.allow_changes=data.size,diffusion.shift", "diffusion.shift=2")) == 0
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    with pytest.raises(T.TrainingError, match="do not fit this model"):  # allowed, but the weights cannot load
        train(tiny_config(data_dir, tmp_path, "train.steps=8", "train.val_every=0", "data.size=24",
                          "diffusion.shift=2", "model.base_channels=24", "train.allow_changes=model.base_channels"))
    with pytest.raises(C.ConfigError, match="train.allow_changes: 'data.sise' is not a config key"):
        tiny_config(data_dir, tmp_path, "train.allow_changes=data.sise")


def test_resume_says_when_it_keeps_the_checkpoints_batch(data_dir, tmp_path):
    assert train(tiny_config(data_dir, tmp_path, "train.steps=4", "train.val_every=0")) == 0
    assert train(tiny_config(data_dir, tmp_path, "train.steps=6", "train.val_every=0", "train.batch_size=4")) == 0
    assert "global batch 2 kept from the checkpoint (train.batch_size=4 x 1 ranks asks for 4)" in \
        (tmp_path / "train.log").read_text()


def test_cuda_rng_state_is_this_devices_own(monkeypatch):
    """Each rank saves and restores only its own GPU's RNG state: a resume on fewer (or more) visible GPUs works.
    CUDA is faked with a device list, so this runs on CPU."""
    visible = {i: torch.tensor([i], dtype=torch.uint8) for i in range(4)}  # 4 GPUs at save time
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: visible[device.index])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(visible.values()))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state), device.index)))
    state = T.rng_state(torch.device("cuda", 3))
    assert [int(s) for s in state["cuda"]] == [3]  # its own, not every visible GPU's
    T.set_rng_state(state, torch.device("cuda", 0))  # resumed as rank 0 of a 1-GPU job
    old = dict(state, cuda=list(visible.values()))  # a checkpoint written before: every visible GPU's state
    T.set_rng_state(old, torch.device("cuda", 2))
    T.set_rng_state(dict(old, cuda=old["cuda"][:2]), torch.device("cuda", 5))  # more GPUs now than then
    T.set_rng_state(state, torch.device("cpu"))  # a GPU checkpoint resumed on CPU: nothing to restore
    assert restored == [(3, 0), (2, 2), (0, 5)]
    assert T.rng_state(torch.device("cpu"))["cuda"] == []


def test_a_read_error_never_quarantines_a_good_checkpoint(data_dir, tmp_path, monkeypatch):
    import errno

    assert train(tiny_config(data_dir, tmp_path, "train.steps=6", "train.ckpt_every=3", "train.val_every=0")) == 0
    newest = tmp_path / "ckpt_000006.pt"
    real = Path.read_bytes
    failures = {"left": 2}

    def flaky(self):
        if self == newest and failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", flaky)
    monkeypatch.setattr(ckpt, "READ_RETRIES", (0.0, 0.0, 0.0))
    state, path = ckpt.load_latest(tmp_path)  # two passing errors, then the read succeeds
    assert path == newest and state["step"] == 6
    failures["left"] = 10  # an error that persists: stop, rename nothing, do not fall back to step 3
    with pytest.raises(ckpt.CheckpointReadError, match="not renamed"):
        ckpt.load_latest(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_000003.pt", "ckpt_000006.pt"]
    # a file with bad bytes is still quarantined, and the previous one used
    monkeypatch.setattr(Path, "read_bytes", real)
    newest.write_bytes(b"not a checkpoint")
    state, path = ckpt.load_latest(tmp_path)
    assert state["step"] == 3 and (tmp_path / "ckpt_000006.pt.corrupt").is_file()


def test_a_failing_preview_is_logged_and_skipped(data_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(T, "preview", broken)
    cfg = tiny_config(data_dir, tmp_path, "train.steps=4", "train.sample_every=2", "train.val_every=0")
    assert train(cfg) == 0
    log = (tmp_path / "train.log").read_text()
    assert log.count("preview at step") == 2 and "OSError: disk quota exceeded" in log
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    failed = [e for e in events if e.get("event") == "preview_failed"]
    assert [e["step"] for e in failed] == [2, 4] and failed[0]["error"] == "OSError: disk quota exceeded"


def test_warnings_and_the_stopping_error_reach_train_log(data_dir, tmp_path):
    """What a user reads after the job: a quarantined checkpoint (a t2v.checkpoint warning) and the error that
    stopped a run are in train.log, not only on stderr."""
    args = [f"data.manifest={data_dir / 'train.jsonl'}", f"data.cache_dir={data_dir / 'cache'}",
            f"text.cache_dir={data_dir / 'cache'}", f"train.outdir={tmp_path}", "train.val_every=0"]
    assert T.main(["--config", str(REPO / "configs/tiny.yaml"), *args, "train.steps=4", "train.ckpt_every=2"]) == 0
    (tmp_path / "ckpt_000004.pt").write_bytes(b"garbage")
    assert T.main(["--config", str(REPO / "configs/tiny.yaml"), *args, "train.steps=6", "data.size=24"]) == 2
    log = (tmp_path / "train.log").read_text()
    assert "warning: " in log and "ckpt_000004.pt: corrupt" in log and "falling back" in log
    assert log.rstrip().splitlines()[-1].startswith("error: ") and "data.size: 16 -> 24" in log
    # a caption cache that is not one stops with its file named and exit 2, not a traceback
    cache_file = next((data_dir / "cache").glob("text_*.pt"))
    saved = cache_file.read_bytes()
    try:
        cache_file.write_bytes(saved[:50])
        assert T.main(["--config", str(REPO / "configs/tiny.yaml"), *args, "train.outdir=" + str(tmp_path / "b")]) == 2
        assert str(cache_file) in (tmp_path / "b" / "train.log").read_text()
    finally:
        cache_file.write_bytes(saved)


def test_a_record_cut_by_a_kill_does_not_swallow_the_next_one(data_dir, tmp_path):
    assert train(tiny_config(data_dir, tmp_path, "train.steps=2", "train.val_every=0")) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5')  # what a SIGKILL in the middle of a write leaves
    assert train(tiny_config(data_dir, tmp_path, "train.steps=4", "train.val_every=0")) == 0
    records = R.read_records(tmp_path)
    assert [r["step"] for r in R.events(records, R.RESUME)] == [2]  # the resume event survived the cut line
