"""A full disk or a quota at write time, for real: a small tmpfs where the tests run as root (what a full scratch
file system does: ENOSPC), and RLIMIT_FSIZE where they need no root (a size limit: EFBIG, as a quota stops a
file). The run says so in one line (where, why, the newest intact checkpoint, what to do) with an ``error`` event,
exits with NO_SPACE_EXIT (the job does not requeue it), loses nothing, and the same command resumes bit-exact
once there is room. A sharded cache build that runs out of room says the same and leaves nothing half-written."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.status import training_error
from runs import REPO, assert_states_equal, load, prepare, tiny_config
from t2v import checkpoint as ckpt
from t2v import config as C
from t2v.runlog import NO_SPACE_EXIT, read_records

pytestmark = pytest.mark.slow
ARGS = ("train.steps=6", "train.ckpt_every=2", "train.keep_last=2", "train.log_every=1", "train.val_every=0")


def mount_tmpfs(path: Path, size: str) -> bool:
    """A tmpfs of ``size`` at ``path`` (root only); False where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """(folder on a 7 MiB tmpfs: room for two of the tiny model's 2.7 MiB checkpoints, not three; grow(size))."""
    fs = tmp_path / "fs"
    if not mount_tmpfs(fs, "7m"):
        pytest.skip("mounting a tmpfs needs root (test_a_size_limit_* covers the rest without it)")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(fs)], check=True)

    yield fs, grow
    subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def run(cfg: C.Config, outdir: Path, *extra: str, limit: int | None = None) -> subprocess.CompletedProcess:
    """`python -m t2v.train` as a user runs it (its exit code and stderr), optionally under RLIMIT_FSIZE."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "t2v.train", "--config", str(REPO / "configs/tiny.yaml"),
           f"data.manifest={cfg.data.manifest}", f"data.cache_dir={cfg.data.cache_dir}",
           f"text.cache_dir={cfg.text.cache_dir}", f"train.outdir={outdir}", *ARGS, *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          preexec_fn=limited if limit else None, timeout=300)


def assert_one_line_error(proc, *parts: str) -> str:
    assert proc.returncode == NO_SPACE_EXIT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no room to write ") and all(p in line for p in parts), line
    return line


def test_a_full_disk_stops_the_run_in_one_line_loses_nothing_and_resumes_bit_exact(tmp_path, small_fs):
    fs, grow = small_fs
    cfg = tiny_config(tmp_path / "data", tmp_path / "ref", *ARGS)
    prepare(cfg, n_train=8)
    outdir = fs / "run"
    proc = run(cfg, outdir)
    line = assert_one_line_error(proc, f"{outdir}/ckpt_000006.pt", "the disk is full", "free on its file system",
                                 f"the newest checkpoint is {outdir}/ckpt_000004.pt", "submit the same command again")
    log = (outdir / "train.log").read_text().splitlines()
    warned = [i for i, text in enumerate(log) if "the next saves may not fit" in text]
    saved4 = next(i for i, text in enumerate(log) if text.endswith("ckpt_000004.pt"))
    assert len(warned) == 1 and warned[0] < saved4, log  # once, a save ahead of the one that failed
    assert log[-1] == line
    last = read_records(outdir)[-1]
    assert last["event"] == "error" and last["reason"] == "no_space" and "the disk is full" in last["error"]
    assert training_error(outdir) == line  # what `make status` shows
    assert not [p.name for p in outdir.rglob("*") if ".tmp-" in p.name]  # no half-written file left
    for step in (2, 4):
        ckpt.load_checkpoint(outdir / f"ckpt_{step:06d}.pt")  # verified loads: both intact

    grow("64m")  # room again: the same command resumes where it stopped and ends as an uninterrupted run
    again = run(cfg, outdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert run(cfg, tmp_path / "ref").returncode == 0
    assert_states_equal(load(outdir / "ckpt_000006.pt"), load(tmp_path / "ref" / "ckpt_000006.pt"))


def test_a_size_limit_stops_the_first_save_the_same_way(tmp_path):
    """Without root: a file size limit below one checkpoint (as a quota stops a file) fails the first save."""
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", *ARGS)
    prepare(cfg, n_train=8)
    proc = run(cfg, tmp_path / "run", limit=1 << 20)
    assert_one_line_error(proc, "ckpt_000002.pt", "a file size limit (ulimit -f) is reached",
                          "no checkpoint was saved yet")
    assert not ckpt.list_checkpoints(tmp_path / "run")
    assert read_records(tmp_path / "run")[-1]["reason"] == "no_space"
    assert run(cfg, tmp_path / "run").returncode == 0  # without the limit: it trains from step 0 to the end


def test_a_sharded_cache_build_out_of_room_says_so_and_leaves_nothing(tmp_path):
    fs = tmp_path / "cache"
    if not mount_tmpfs(fs, "128k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        cfg = tiny_config(tmp_path / "data", tmp_path / "run", "data.size=64", "data.frames=8")
        from t2v.data.demo import make_demo

        make_demo(tmp_path / "data", n_train=8, n_val=2, n_test=2, seed=0)
        cmd = [sys.executable, "-m", "t2v.data", "cache", "--shard", "0/2", "--config",
               str(REPO / "configs/tiny.yaml"), f"data.manifest={cfg.data.manifest}", f"data.cache_dir={fs}",
               "data.size=64", "data.frames=8"]  # a part: 4 clips of 8 x 64 x 64 x 3 bytes, ~390 KiB
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == NO_SPACE_EXIT, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: no room to write ") and "the disk is full" in line, line
        assert not list(fs.iterdir())  # nothing half-written
        subprocess.run(["mount", "-o", "remount,size=8m", str(fs)], check=True)
        again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(list(fs.glob("*.part0000-of-0002.npy"))) == 1
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def test_tensorboard_out_of_room_raises_in_training_without_a_thread_traceback(tmp_path, capfd):
    """TensorBoard writes from a thread of its own: a full disk there reaches the training thread at its next call
    (which main() turns into the one line), and the thread's own traceback is not printed."""
    from t2v.files import no_space
    from t2v.tracking import TensorBoard

    fs = tmp_path / "tb"
    if not mount_tmpfs(fs, "64k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        tb = TensorBoard(fs / "events")
        with pytest.raises(OSError) as e:
            for step in range(100_000):
                tb.record({"step": step, "loss": 0.5, "lr": 1e-3})
                if step % 1000 == 0:
                    tb.writer.flush()
        assert no_space(e.value) is not None
        err = capfd.readouterr().err
        assert "Traceback" not in err and "Exception in thread" not in err, err
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)
