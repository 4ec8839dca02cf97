"""End to end on a real single-node Slurm (tests/slurm/testbed.sh): submit, preemption, time limits, restart
cap, and the submitit path. Real sbatch/scontrol/squeue throughout; training is the tiny CPU config.

The session fixture starts the test cluster (tests/slurmtest.py: installing Slurm with apt when root and it is
missing), or reuses one already running (and then leaves it running), gives the session fresh folders (job ids
restart at 1 on every fresh cluster), and stops the cluster at the end. Tests run serially: they share the node
and its two CPUs. The two-node cluster's tests are in tests/test_slurm_two_nodes.py.
Jobs run through tests/slurm/container.sh (the local profile's launcher), where scontrol & co. are not on PATH.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

import slurmtest
from slurmtest import (PY, REPO, assert_bit_identical, data_args, job, losses_consistent, make_submit,
                       progressed, resume_step, resumes, wait_ended, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SPEED: dict[str, float] = {}  # seconds per training step, measured by the first runs of the session


# --- the cluster, the data --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    with slurmtest.cluster(tmp_path_factory.mktemp("slurm")) as base:
        yield base


@pytest.fixture(scope="session")
def demo(cluster, slurm_demo):
    return slurm_demo


def preempt() -> str:
    """A job on the high partition asking for every CPU: Slurm preempts (requeues) the low job for it."""
    p = subprocess.run(["sbatch", "--parsable", "-p", "high", "-n", "2", "-o", "/dev/null", "-J", "preemptor",
                        "--wrap", "sleep 5"], capture_output=True, text=True, check=True)
    return p.stdout.strip()


def preempted_once(run: Path, jid: str, after: int, what: str) -> str:
    """Preempt job ``jid`` once it has trained ``after`` steps, wait for the resume and the end; its job log (the
    job completed after one restart)."""
    wait_for(lambda: progressed(run, 0, after), 300, what)
    preempt()
    wait_for(lambda: len(resumes(run)) >= 1, 300, "the resume")
    info = wait_ended(jid, 900)
    out = (run / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    return out


def measure_speed(run: Path) -> None:
    times = [r["step_time"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "step_time" in r]
    if times:
        SPEED["step"] = sorted(times)[len(times) // 2]


PREEMPT_STEPS = 300
TRAIN_EXTRA = ("train.log_every=1", "train.ckpt_every=50")


@pytest.fixture(scope="session")
def reference(cluster, demo):
    """The same training as the preempted runs, uninterrupted, directly on the host (started in the background
    as soon as a test needs it)."""
    out = cluster / "reference"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in the jobs (local profile): same kernels, same bits
    proc = subprocess.Popen([PY, "-m", "t2v.train", "--config", "configs/tiny.yaml", *data_args(demo),
                             f"train.outdir={out}", f"train.steps={PREEMPT_STEPS}", *TRAIN_EXTRA],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finished() -> Path:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
        measure_speed(out)
        return out
    yield finished
    if proc.poll() is None:
        proc.kill()


# --- the tests --------------------------------------------------------------------------------------------

def test_make_submit_runs_to_completion(cluster, demo):
    run = cluster / "basic run"  # a space in the path, on purpose
    jid = make_submit(run, demo, 30, "train.log_every=5", "train.ckpt_every=10", JOB_NAME="basic $(x); y",
                      EVAL="1", EVAL_MANIFEST=str(demo / "test.jsonl"), EVAL_ARGS="--num 2 --steps 2 --no-fvd")
    eval_id = json.loads((Path(os.environ["T2V_HOME"]) / "runs.jsonl").read_text().splitlines()[-1])["eval_job_id"]
    assert job(eval_id).get("Dependency", "").startswith(f"afterok:{jid}")
    info = wait_ended(jid, 300)
    out = (run / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    raw = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    assert " JobName=basic $(x); y UserId=" in raw  # sbatch read the quoted directive literally
    assert "training finished" in out and "done: 30 steps" in out

    st = subprocess.run(["make", "-s", "status"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    row = next(l for l in st.splitlines() if l.split()[:1] == [jid])
    assert re.match(rf"{jid}\s+COMPLETED\s+0\s+30/30\s+\S+\s+{re.escape(str(run))}$", row), st
    shown = Path(row.split(None, 5)[5])
    assert (shown / "ckpt_000030.pt").is_file() and (shown / "train.log").is_file()
    assert (shown / "train.sbatch").is_file() and (shown / "job_config.yaml").is_file()

    logs = subprocess.run(["make", "-s", "logs", f"RUN={jid}"], cwd=REPO, capture_output=True, text=True,
                          timeout=60).stdout
    assert "training finished" in logs and "COMPLETED" in logs
    # EVAL=1: the evaluation job ran once training had completed (whether t2v.eval succeeds is not tested here)
    ev = wait_ended(eval_id, 300)
    assert ev["StartTime"] >= info["EndTime"]
    assert f"evaluating {run}" in (run / f"eval-{eval_id}.out").read_text()
    measure_speed(run)


def test_preempted_twice_resumes_bit_exact(cluster, demo, reference):
    run = cluster / "preempted"
    jid = make_submit(run, demo, PREEMPT_STEPS, *TRAIN_EXTRA, "train.wandb=offline")
    # 1st preemption as soon as the job runs, while Python is still starting: the job script holds the signal
    # until training listens (or, if training cannot save in time, requeues because the job is being preempted).
    wait_for(lambda: job(jid).get("JobState") == "RUNNING", 300, "the job to start")
    preempt()
    wait_for(lambda: progressed(run, 1, resume_step(run, 0) + 10), 300, "the first resume and 10 more steps")
    # 2nd preemption in the middle of training.
    preempt()
    wait_for(lambda: len(resumes(run)) >= 2, 300, "the second resume")
    info = wait_ended(jid, 600)
    out = (run / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    assert info["Restarts"] == "2", out
    # Each preemption ended in a requeue: the job's own, or Slurm's where training's exit outlasted the grace time
    # (10 s here; once, on a loaded CI host, 22 s passed between the save at the signal and the process's exit).
    # Either way the next restart resumes from what was saved: the resumes and the bit-exact end below check that.
    ends = [line for line in out.splitlines()
            if line.endswith("; requeueing") or "Slurm requeues it); training" in line]
    assert len(ends) == 2 and "restart 2: training finished" in out, out
    res = resumes(run)
    assert len(res) == 2 and "(restart 1)" in res[0] and "(restart 2)" in res[1], res
    assert (run / f"ckpt_{PREEMPT_STEPS:06d}.pt").is_file()

    ref = reference()
    logged = losses_consistent(run)  # no step logged twice with different losses
    assert logged == losses_consistent(ref)  # and every loss equals the uninterrupted run's
    assert_bit_identical(run / f"ckpt_{PREEMPT_STEPS:06d}.pt", ref / f"ckpt_{PREEMPT_STEPS:06d}.pt")
    # where people look: TensorBoard and W&B show every step once, with the losses of the uninterrupted run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from t2v import tracking

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    expected = sorted((step, float(loss)) for step, loss in logged.items())  # the log prints 4 decimals
    tb = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb] == [s for s, _ in expected]
    assert [v for _, v in tb] == pytest.approx([v for _, v in expected], abs=6e-5)
    run_id = (run / tracking.RUN_ID_FILE).read_text().strip()
    dirs = tracking.offline_runs(run, run_id)
    assert len(dirs) == 3  # one offline run folder per process, one W&B run
    rows = [r for d in dirs for r in tracking.wandb_history(d) if "train/loss" in r]
    assert [r["_step"] for r in rows] == [s for s, _ in expected]
    assert [r["train/loss"] for r in rows] == pytest.approx([v for _, v in expected], abs=6e-5)
    assert subprocess.run([PY, "tools/report.py", str(run)], cwd=REPO, capture_output=True).returncode == 0
    assert (run / "report" / "index.html").is_file()


def test_time_limit_signal_saves_and_requeues_until_done(cluster, demo):
    # One-minute jobs; the warning (--signal=B:USR1@15) lands 15-45 s into each run. Enough steps for about
    # 70 s of training at the speed measured earlier in this session, so it needs several jobs.
    per_step = SPEED.get("step", 0.1)
    steps = max(200, min(4000, int(70 / per_step)))
    run = cluster / "time limit"
    jid = make_submit(run, demo, steps, "train.log_every=10", "train.ckpt_every=100", TIME="1")
    info = wait_ended(jid, 900)
    out = (run / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    assert int(info["Restarts"]) >= 1, out
    assert "signal SIGUSR1 at step" in out and "DUE TO TIME LIMIT" not in out
    assert len(resumes(run)) == int(info["Restarts"])
    losses_consistent(run)
    assert (run / f"ckpt_{steps:06d}.pt").is_file()


def test_restart_cap_stops_requeueing(cluster, demo):
    run = cluster / "capped"
    jid = make_submit(run, demo, 5000, "train.log_every=1", "train.ckpt_every=1000", "train.max_restarts=1")
    wait_for(lambda: progressed(run, 0, 5), 300, "training to start")
    # 1st stop: SIGTERM to the step only -- what a cluster without preempt_send_user_signal sends at
    # preemption. Training saves and exits 75; the batch shell requeues (restart 0 < cap 1).
    subprocess.run(["scancel", "--signal=TERM", jid], check=True)
    wait_for(lambda: progressed(run, 1, resume_step(run, 0) + 3), 300, "the resume and 3 more steps")
    # 2nd stop: a real preemption. Restart 1 >= cap 1: saved, not requeued, clear message, non-zero exit.
    preempt()
    info = wait_ended(jid, 300)
    out = (run / f"slurm-{jid}.out").read_text()
    assert "signal SIGTERM at step" in out and "signal SIGUSR1 at step" in out, out
    assert "restart cap 1 reached; not requeueing. Resume by hand with: sbatch" in out, out
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", info
    assert info["Restarts"] == "1"
    # the checkpoint of the last stop is there, so resubmitting the script would resume from it
    stopped_at = int(re.findall(r"signal SIGUSR1 at step (\d+)", out)[-1])
    assert (run / f"ckpt_{stopped_at:06d}.pt").is_file()


def test_make_cancel_is_final(cluster, demo):
    run = cluster / "cancelled"
    jid = make_submit(run, demo, 5000, "train.log_every=1", "train.ckpt_every=1000")
    wait_for(lambda: progressed(run, 0, 5), 300, "training to start")
    p = subprocess.run(["make", "-s", "cancel", f"RUN={run}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and f"cancelled job(s) {jid}" in p.stdout, p.stdout + p.stderr
    info = wait_ended(jid, 120)
    time.sleep(8)  # longer than a requeue hold (cred_expire + 1 s): it must not come back
    info = job(jid)
    out = (run / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", out
    assert "Slurm is ending this job (cancelled)" in out and "requeueing" not in out, out


def test_submitit_path_survives_preemption(cluster, demo, reference):
    from jobs.submitit_launch import launch

    run = cluster / "submitit"
    env = {**os.environ, "PROFILE": "local", "CONFIG": "configs/tiny.yaml", "OUTDIR": str(run),
           "STEPS": str(PREEMPT_STEPS), "JOB_NAME": "submitit"}
    j = launch(env, [*data_args(demo), *TRAIN_EXTRA])
    wait_for(lambda: progressed(run, 0, 10), 300, "training to pass step 10")
    preempt()
    wait_for(lambda: len(resumes(run)) >= 1, 300, "the resume")
    wait_for(j.done, 600, "the submitit job to finish", poll=1)
    assert j.result() == 0
    log = Path(j.paths.stdout).read_text()
    # submitit's USR2 handler ran TrainTask.checkpoint(), which waited for the save; submitit then requeued
    assert "Caught signal SIGUSR2" in log and "training exited with code 75 after the checkpoint signal" in log, log
    assert "restart 1:" in log and "Job completed successfully" in log, log
    assert job(j.job_id).get("Restarts") == "1"
    ref = reference()
    assert losses_consistent(run) == losses_consistent(ref)
    assert_bit_identical(run / f"ckpt_{PREEMPT_STEPS:06d}.pt", ref / f"ckpt_{PREEMPT_STEPS:06d}.pt")



def test_two_task_ddp_job_is_preempted_and_resumes(cluster, demo):
    """DDP through Slurm: 2 gloo ranks as srun tasks; a preemption saves once (rank 0), requeues, resumes."""
    run = cluster / "ddp"
    jid = make_submit(run, demo, 400, "train.log_every=1", "train.ckpt_every=1000", "train.batch_size=1",
                      TASKS="2")
    out = preempted_once(run, jid, 5, "both ranks to train")
    assert "global batch 2 = 2 x 1" in (run / "train.log").read_text()
    assert "; requeueing" in out and "restart 1: training finished" in out
    losses_consistent(run)  # every step after the resume continues where the saved one stopped
    assert (run / "ckpt_000400.pt").is_file()


def test_two_task_fsdp_job_is_preempted_and_resumes_bit_exact(cluster, demo):
    """train.parallel=fsdp through the same job script: each of 2 ranks writes its shards into the checkpoint
    folder; a preemption saves, requeues and resumes, and the end is bit-identical to 2 ranks uninterrupted on the
    host."""
    from runs import finish, launch

    steps, extra = 100, ("train.log_every=1", "train.ckpt_every=50", "train.batch_size=1", "train.parallel=fsdp")
    run, ref = cluster / "fsdp", cluster / "fsdp reference"
    jid = make_submit(run, demo, steps, *extra, TASKS="2")
    host = launch(demo, ref, 2, f"train.steps={steps}", *extra)
    out = preempted_once(run, jid, 5, "both ranks to train")
    assert "; requeueing" in out and "restart 1: training finished" in out
    assert [rc for rc, _ in finish(host, 600)] == [0, 0]
    stop = resume_step(run, 0)
    assert re.search(rf"^saved {re.escape(str(run))}/ckpt_{stop:06d}$", (run / "train.log").read_text(), re.M)
    assert (run / f"ckpt_{steps:06d}" / "__1_0.distcp").is_file()
    assert losses_consistent(run) == losses_consistent(ref)
    assert_bit_identical(run / f"ckpt_{steps:06d}", ref / f"ckpt_{steps:06d}")
    row = next(l for l in subprocess.run(["make", "-s", "status"], cwd=REPO, capture_output=True, text=True,
                                         check=True).stdout.splitlines() if l.split()[:1] == [jid])
    assert re.match(rf"{jid}\s+COMPLETED\s+1\s+{steps}/{steps}\s", row), row


# each pretrained family's way of training, on a tiny model saved in the hub's layout (tests/pretrained.py)
FAMILIES = {
    "wan_lora": ("diffusion.objective=flow", "train.finetune=lora", "train.lora_rank=4"),
    "animatediff_motion": ("diffusion.objective=ddpm", "diffusion.schedule=linear", "diffusion.beta_start=0.00085",
                           "diffusion.beta_end=0.012", "diffusion.prediction=eps", "train.finetune=motion"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_pretrained_fine_tune_is_preempted_and_resumes_bit_exact(cluster, demo, family):
    """A pretrained fine-tune through the same job script: a Wan LoRA, or AnimateDiff's motion modules on a tiny
    SD UNet, preempted once, requeued, and at the end bit-identical to the same run uninterrupted on the host; its
    checkpoints hold what trains only."""
    from pretrained import save_sd_pipeline, save_wan_pipeline

    arch = family.split("_")[0]
    save = save_wan_pipeline if arch == "wan" else save_sd_pipeline
    base = save(cluster / f"{family}_base", in_channels=3, text_dim=64)  # pixels; tiny.yaml's 64-d captions
    text = cluster / f"{family}_text"  # per-token captions, beside the shared cache (which has none)
    over = [f"model.arch={arch}", f"model.pretrained={base}", *FAMILIES[family], "text.tokens=true",
            f"text.cache_dir={text}", "train.log_every=1", "train.ckpt_every=20", "train.val_every=0"]
    embed = subprocess.run([PY, "-m", "t2v.text", "embed", "--config", "configs/tiny.yaml", *data_args(demo), *over],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert embed.returncode == 0, embed.stderr
    steps = 120
    run = cluster / family
    jid = make_submit(run, demo, steps, *over)
    ref = cluster / f"{family}_reference"
    host = subprocess.Popen([PY, "-m", "t2v.train", "--config", "configs/tiny.yaml", *data_args(demo), *over,
                             f"train.outdir={ref}", f"train.steps={steps}"], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    preempted_once(run, jid, 10, f"the {family} run to train")
    assert host.wait(timeout=600) == 0, host.stderr.read()
    final = f"ckpt_{steps:06d}.pt"
    assert_bit_identical(run / final, ref / final)
    state = torch.load(run / final, map_location="cpu", weights_only=True)
    trained = "lora_" if family == "wan_lora" else "motion_modules"
    assert all(trained in k for k in state["model"] if k != "null_tokens") and state["data"]["base"]["name"] == str(base)


@pytest.mark.parametrize("sampling", ["even", "window"])
def test_sharded_cache_build_on_slurm_equals_a_local_build(cluster, demo, sampling):
    """make cache-submit SHARDS=3: a job array of 3 shards and a merge job after it, on the real test Slurm, write
    the clip cache (or the window cache at 8 fps) a single local process writes, byte for byte."""
    from t2v.data.cache import build_cache, open_cache
    from t2v.data.manifest import read_manifest
    from t2v.data.window_build import build_windows
    from t2v.data.windows import Rate, open_windows

    run, cache_dir = cluster / f"cache-jobs-{sampling}", cluster / f"sharded-cache-{sampling}"
    args = f"data.manifest={demo / 'train.jsonl'} data.cache_dir={cache_dir}" + (
        " data.sampling=window data.fps=8" if sampling == "window" else "")
    p = subprocess.run(["make", "-s", "cache-submit", "PROFILE=local", "CONFIG=configs/tiny.yaml", "SHARDS=3",
                        f"OUTDIR={run}", f"ARGS={args}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    array_id, merge_id = re.search(r"submitted job array (\d+) \(3 shards\) and merge job (\d+)", p.stdout).groups()
    info = wait_ended(merge_id, 600)
    logs = "".join(f.read_text() for f in sorted(run.glob("cache*.out")))
    assert info["JobState"] == "COMPLETED", logs
    assert len(list(run.glob(f"cache-{array_id}_*.out"))) == 3  # one log per array task
    clips = read_manifest(demo / "train.jsonl")
    if sampling == "window":
        sharded = open_windows(clips, 16, Rate(fps=8.0), cache_dir)
        local = build_windows(clips, 16, Rate(fps=8.0), cluster / "local-windows", progress=False)
    else:
        sharded = open_cache(clips, 4, 16, cache_dir)
        local = build_cache(clips, 4, 16, cluster / "local-cache", progress=False)
    assert sharded is not None and sharded.npy.read_bytes() == local.npy.read_bytes()
    assert not list(cache_dir.glob("*.part*"))
