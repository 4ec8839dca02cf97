"""What the Slurm integration tests share: a test cluster per module or session (tests/slurm/testbed.sh, one node
or two), the demo data made by the documented commands, and helpers that read job state and run logs.
Real sbatch/scontrol/squeue throughout; nothing here mocks Slurm."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "tests/slurm/testbed.sh"
PY = sys.executable
STEP_RE = re.compile(r"^step (\d+) \| loss (\S+)$")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL")


@contextmanager
def cluster(base: Path, nodes: int = 1):
    """The test cluster with `nodes` nodes, started here (installing Slurm with apt when root and it is missing)
    or reused if one is already running (and then left running); SLURM_CONF and T2V_HOME point at it and at a fresh
    folder under `base` while the block runs. Job ids restart at 1 on every fresh cluster."""
    have_slurm = shutil.which("slurmctld") and shutil.which("sbatch") and shutil.which("munged")
    if not have_slurm and os.geteuid() != 0:
        pytest.skip("Slurm is not installed and we are not root to install it "
                    "(apt-get install slurmctld slurmd slurm-client munge, or run as root)")
    if nodes > 1 and (os.geteuid() != 0 or not shutil.which("unshare")):
        pytest.skip("the two-node test cluster needs root and unshare (a UTS namespace per node)")
    box_env = {**os.environ, "NODES": str(nodes)}
    st = subprocess.run(["bash", str(TESTBED), "status"], capture_output=True, text=True, env=box_env)
    started = st.returncode != 0
    if started:
        up = subprocess.run(["bash", str(TESTBED), "up"], capture_output=True, text=True, env=box_env, timeout=600)
        assert up.returncode == 0, f"testbed up failed:\n{up.stdout}\n{up.stderr}"
        out = up.stdout
    else:
        out = st.stdout
    m = re.search(r"^export SLURM_CONF=(\S+)$", out, re.M)
    assert m, out
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "T2V_HOME")}
    os.environ["SLURM_CONF"] = m.group(1)
    os.environ["T2V_HOME"] = str(base / "t2v_home")
    try:
        yield base
    finally:
        ids = squeue_ids()
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
        if started:
            subprocess.run(["bash", str(TESTBED), "down"], capture_output=True, text=True, timeout=120, env=box_env)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_testbed(*args: str, nodes: int = 1) -> str:
    """A testbed.sh command (status, freeze NODE, reboot NODE) on the cluster with `nodes` nodes."""
    p = subprocess.run(["bash", str(TESTBED), *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NODES": str(nodes)})
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def make_demo(d: Path) -> Path:
    """The demo dataset with its clip cache and caption embeddings, made by the documented commands."""
    subprocess.run([PY, "-m", "t2v.data", "demo", "--out", str(d)], cwd=REPO, check=True, capture_output=True)
    for cmd in (["t2v.data", "cache"], ["t2v.text", "embed"]):
        subprocess.run([PY, "-m", *cmd, "--config", "configs/tiny.yaml", *data_args(d)], cwd=REPO, check=True,
                       capture_output=True)
    return d


def data_args(d: Path) -> list[str]:
    return [f"data.manifest={d / 'train.jsonl'}", f"data.cache_dir={d / 'cache'}", f"text.cache_dir={d / 'cache'}"]


# --- helpers ----------------------------------------------------------------------------------------------

def squeue_ids() -> list[str]:
    p = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True)
    return p.stdout.split() if p.returncode == 0 else []


def job(jid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(pred, timeout: float, what: str, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_ended(jid: str, timeout: float) -> dict[str, str]:
    return wait_for(lambda: (j := job(jid)).get("JobState") in ENDED and j, timeout, f"job {jid} to end")


def steps_logged(run: Path) -> list[tuple[int, str]]:
    log = run / "train.log"
    if not log.is_file():
        return []
    return [(int(m.group(1)), m.group(2)) for l in log.read_text().splitlines() if (m := STEP_RE.match(l))]


def resumes(run: Path) -> list[str]:
    log = run / "train.log"
    return [l for l in log.read_text().splitlines() if l.startswith("resumed from")] if log.is_file() else []


def resume_step(run: Path, i: int) -> int:
    """The step the i-th resume started from (10**9 while it has not happened)."""
    r = resumes(run)
    return int(r[i].split(" at step ")[1].split()[0]) if len(r) > i else 10 ** 9


def last_step(run: Path) -> int:
    s = steps_logged(run)
    return s[-1][0] if s else -1


def progressed(run: Path, n_resumes: int, beyond: int) -> bool:
    """The run restarted n_resumes times and has since logged a step past `beyond` (handlers are installed)."""
    return len(resumes(run)) >= n_resumes and last_step(run) > beyond


def make_submit(run: Path, demo: Path, steps: int, *extra: str, **env: str) -> str:
    """`make submit` as a user types it; `env` goes through the environment (make would expand a `$` in a
    command-line variable)."""
    args = " ".join([*data_args(demo), *extra])
    cmd = ["make", "-s", "submit", "PROFILE=local", "CONFIG=configs/tiny.yaml", f"OUTDIR={run}", f"STEPS={steps}",
           f"ARGS={args}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert p.returncode == 0, f"make submit failed:\n{p.stdout}\n{p.stderr}"
    m = re.search(r"^submitted job (\d+)", p.stdout, re.M)
    assert m, p.stdout
    return m.group(1)


def losses_consistent(run: Path) -> dict[int, str]:
    seen: dict[int, str] = {}
    for step, loss in steps_logged(run):
        assert seen.setdefault(step, loss) == loss, f"step {step} logged with losses {seen[step]} and {loss}"
    return seen


def tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in obj:
            yield from tensors(obj[k], f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")


def assert_bit_identical(a: Path, b: Path) -> None:
    """Two checkpoints, files or sharded folders (train.parallel=fsdp), hold the same tensors."""
    from t2v.checkpoint import load_checkpoint

    sa, sb = load_checkpoint(a), load_checkpoint(b)
    ta, tb = dict(tensors(sa)), dict(tensors(sb))
    assert ta.keys() == tb.keys()
    assert any(k.startswith(".model") for k in ta) and any(k.startswith(".optimizer") for k in ta)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    # every tensor, RNG states included: a resumed run is indistinguishable from an uninterrupted one
    assert not differ, f"{differ} differ between {a} and {b}"
