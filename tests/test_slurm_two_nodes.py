"""End to end on a real two-node Slurm (NODES=2 tests/slurm/testbed.sh: nodes tn1 and tn2 on this machine, each
slurmd in its own UTS namespace): training with a rank on each node, preemption and `scontrol requeue`, the
submitit path, a rank killed, a rank hung, a node lost, the rendezvous port, and Slurm's refusals.

Lean on purpose (the tiny config, 4x16x16, one CPU per rank): these machines have 2 cores and the two nodes claim 4.
The module fixture starts the cluster beside the single-node one (its ports are picked free) and stops it at
the end of the module.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import slurmtest
from runs import assert_close, load
from slurmtest import (PY, REPO, assert_bit_identical, data_args, job, losses_consistent, make_submit, progressed,
                       resume_step, resumes, run_testbed, squeue_ids, wait_ended, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TWO_NODES = {"NODES": "2", "TASKS": "1"}  # a rank on each node
STEPS = 100
EXTRA = ("train.log_every=1", "train.ckpt_every=25")


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    with slurmtest.cluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as base:
        yield base


@pytest.fixture(scope="module")
def demo(cluster2, slurm_demo):
    return slurm_demo


def preempt() -> str:
    """A high-partition job asking for every CPU of both nodes: Slurm preempts (requeues) the low job for it."""
    p = subprocess.run(["sbatch", "--parsable", "-p", "high", "-N", "2", "--ntasks-per-node=2", "-o", "/dev/null",
                        "-J", "preemptor", "--wrap", "sleep 5"], capture_output=True, text=True, check=True)
    return p.stdout.strip()


def events(run: Path, name: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == name]


def rank_pid(jid: str, rank: int) -> int:
    """The training process of `rank` in job `jid` (its environment says SLURM_JOB_ID and SLURM_PROCID)."""
    def find():
        for p in Path("/proc").iterdir():
            try:
                if b"t2v.train" not in (p / "cmdline").read_bytes():
                    continue
                env = dict(v.split("=", 1) for v in (p / "environ").read_bytes().decode(errors="replace").split("\0")
                           if "=" in v)
            except OSError:
                continue
            if env.get("SLURM_JOB_ID") == jid and env.get("SLURM_PROCID") == str(rank):
                return int(p.name)
        return None
    return wait_for(find, 60, f"rank {rank} of job {jid}")


def status_text() -> str:
    return subprocess.run(["make", "-s", "status"], cwd=REPO, capture_output=True, text=True, check=True).stdout


def job_log(run: Path, jid: str) -> str:
    return (run / f"slurm-{jid}.out").read_text()


@pytest.fixture(scope="module")
def straight(cluster2, demo):
    """An uninterrupted two-node run (the reference of the interrupted ones), and one process on the host at
    the same global batch (4 = 2 ranks x 2 = 1 x 4), started side by side."""
    one = cluster2 / "one process"
    ref = subprocess.Popen([PY, "-m", "t2v.train", "--config", "configs/tiny.yaml", *data_args(demo),
                            f"train.outdir={one}", f"train.steps={STEPS}", "train.batch_size=4", *EXTRA],
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    run = cluster2 / "two nodes"
    jid = make_submit(run, demo, STEPS, *EXTRA, **TWO_NODES)
    info = wait_ended(jid, 600)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    assert info["JobState"] == "COMPLETED", job_log(run, jid)
    return run, one, jid


# --- the tests --------------------------------------------------------------------------------------------

def test_make_submit_trains_with_a_rank_on_each_node_like_one_process(straight):
    run, one, jid = straight
    log = (run / "train.log").read_text()
    assert "ranks: 2 (rank 0 on tn1, rank 1 on tn2)" in log
    assert "global batch 4 = 2 x 2" in log
    start, = events(run, "start")
    assert start["world_size"] == 2 and start["nodes"] == ["tn1", "tn2"]
    assert {r["world_size"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r} == {2}
    assert re.search(r"^ranks: 2 .* \| rendezvous tn1:\d+ \|", log, re.M)
    assert "restart 0: starting on tn[1-2]" in job_log(run, jid)
    assert not list(run.glob(".rendezvous-*"))  # rank 0's port file is gone once the run is done
    # two nodes at a global batch of 4 train what one process does with a batch of 4, to float tolerance
    assert_close(load(run / f"ckpt_{STEPS:06d}.pt"), load(one / f"ckpt_{STEPS:06d}.pt"))


def test_preempted_then_scontrol_requeued_resumes_on_both_nodes_bit_exact(cluster2, demo, straight):
    run = cluster2 / "interrupted"
    jid = make_submit(run, demo, STEPS, *EXTRA, **TWO_NODES)
    wait_for(lambda: progressed(run, 0, 10), 300, "both ranks to train 10 steps")
    preempt()
    wait_for(lambda: progressed(run, 1, resume_step(run, 0) + 10), 300, "the resume and 10 more steps")
    # Slurm requeues the job itself: TERM to the job, which saves and leaves the requeue to Slurm
    subprocess.run(["scontrol", "requeue", jid], check=True)
    wait_for(lambda: len(resumes(run)) >= 2, 300, "the second resume")
    info = wait_ended(jid, 600)
    out = job_log(run, jid)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", out
    assert "restart 0: checkpoint saved after SIGUSR1; requeueing" in out, out
    assert "restart 1: Slurm is ending this job: scontrol requeue: Slurm requeues it" in out, out
    assert "Resume by hand" not in out and "restart 2: training finished" in out, out
    for resume in events(run, "resume"):
        assert resume["world_size"] == 2 and resume["nodes"] == ["tn1", "tn2"]
    ref = straight[0]
    assert losses_consistent(run) == losses_consistent(ref)
    assert_bit_identical(run / f"ckpt_{STEPS:06d}.pt", ref / f"ckpt_{STEPS:06d}.pt")


def test_submitit_two_nodes_survives_preemption_bit_exact(cluster2, demo, straight):
    from jobs.submitit_launch import launch

    run = cluster2 / "submitit"
    env = {**os.environ, "PROFILE": "local", "CONFIG": "configs/tiny.yaml", "OUTDIR": str(run), "STEPS": str(STEPS),
           "JOB_NAME": "submitit2", **TWO_NODES}
    j = launch(env, [*data_args(demo), *EXTRA])
    wait_for(lambda: progressed(run, 0, 10), 300, "training to pass step 10")
    # the ranks met on the first node, through the run folder, as with make submit
    assert re.search(r"ranks: 2 \(rank 0 on tn1, rank 1 on tn2\) \| rendezvous tn1:\d+", (run / "train.log").read_text())
    preempt()
    wait_for(lambda: len(resumes(run)) >= 1, 300, "the resume")
    wait_for(j.done, 600, "the submitit job to finish", poll=1)
    assert j.results() == [0, 0]  # one result per task: a rank on each node
    assert job(j.job_id).get("Restarts") == "1"
    ref = straight[0]
    assert losses_consistent(run) == losses_consistent(ref)
    assert_bit_identical(run / f"ckpt_{STEPS:06d}.pt", ref / f"ckpt_{STEPS:06d}.pt")


def test_fsdp_on_two_nodes_is_preempted_and_resumes_bit_exact(cluster2, demo):
    """train.parallel=fsdp with a rank on each node: the shards are written on both nodes into one folder of the
    shared run folder; preempted once, requeued, and at the end bit-identical to 2 ranks uninterrupted on the
    host."""
    from runs import finish, launch

    run, ref = cluster2 / "fsdp", cluster2 / "fsdp reference"
    jid = make_submit(run, demo, STEPS, *EXTRA, "train.parallel=fsdp", **TWO_NODES)
    host = launch(demo, ref, 2, f"train.steps={STEPS}", *EXTRA, "train.parallel=fsdp")
    wait_for(lambda: progressed(run, 0, 10), 300, "both ranks to train 10 steps")
    preempt()
    wait_for(lambda: len(resumes(run)) >= 1, 300, "the resume")
    info = wait_ended(jid, 600)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_log(run, jid)
    assert [rc for rc, _ in finish(host, 600)] == [0, 0]
    assert "ranks: 2 (rank 0 on tn1, rank 1 on tn2)" in (run / "train.log").read_text()
    assert losses_consistent(run) == losses_consistent(ref)
    assert_bit_identical(run / f"ckpt_{STEPS:06d}", ref / f"ckpt_{STEPS:06d}")


def test_a_killed_rank_fails_the_job_at_once_and_does_not_requeue(cluster2, demo):
    run = cluster2 / "killed rank"
    jid = make_submit(run, demo, 5000, "train.log_every=5", "train.ckpt_every=1000", **TWO_NODES)
    wait_for(lambda: progressed(run, 0, 5), 300, "training to start")
    os.kill(rank_pid(jid, 1), signal.SIGKILL)  # rank 1, on tn2: what the OOM killer does
    t0 = time.time()
    info = wait_ended(jid, 120)
    print(f"\nmeasured: a SIGKILLed rank ended the two-node job in {time.time() - t0:.1f} s")
    time.sleep(6)  # longer than a requeue hold (cred_expire + 1 s): it must not come back
    info = job(jid)
    out = job_log(run, jid)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", out
    assert re.search(r"restart 0: training failed with exit code \d+; not requeueing", out), out
    st = status_text()
    assert re.search(rf"job {jid} \(FAILED\): restart 0: training failed with exit code \d+; not requeueing", st), st


def test_a_hung_rank_times_out_after_dist_timeout_s_and_does_not_loop(cluster2, demo):
    run = cluster2 / "hung rank"
    jid = make_submit(run, demo, 5000, "train.log_every=5", "train.ckpt_every=1000", "train.dist_timeout_s=8",
                      **TWO_NODES)
    wait_for(lambda: progressed(run, 0, 5), 300, "training to start")
    assert "collective timeout 8 s" in (run / "train.log").read_text()
    os.kill(rank_pid(jid, 1), signal.SIGSTOP)  # rank 1 hangs; its node answers Slurm as before
    t0 = time.time()
    info = wait_ended(jid, 120)
    print(f"\nmeasured: a hung rank ended the two-node job in {time.time() - t0:.1f} s (train.dist_timeout_s=8)")
    assert time.time() - t0 >= 8
    out = job_log(run, jid)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", out
    assert "rank 0 on tn1: no answer from the other ranks within train.dist_timeout_s=8 s" in out, out
    st = status_text()
    assert f"job {jid} (FAILED): restart 0: training failed" in st, st
    assert "error: rank 0 on tn1: no answer from the other ranks" in st, st


def test_a_lost_node_fails_over_to_slurm_which_requeues_and_resumes(cluster2, demo):
    run = cluster2 / "lost node"
    jid = make_submit(run, demo, 80, "train.log_every=1", "train.ckpt_every=20", **TWO_NODES)
    wait_for(lambda: progressed(run, 0, 30), 300, "training past its first checkpoints")
    run_testbed("freeze", "tn2", nodes=2)  # tn2 stops answering: slurmd, its step and rank 1 alike
    t0 = time.time()
    try:
        wait_for(lambda: job(jid).get("Restarts") == "1" and job(jid).get("JobState") == "PENDING", 120,
                 "Slurm to declare tn2 lost and requeue the job")
        print(f"\nmeasured: Slurm declared the frozen node down and requeued the job in {time.time() - t0:.1f} s "
              "(SlurmdTimeout=10)")
        out = job_log(run, jid)
        assert "restart 0: Slurm is ending this job: node failure: tn2 not responding; Slurm requeues it" in out, out
        # once the requeue hold (cred_expire) is over, the job waits for its nodes, and make status says so
        wait_for(lambda: job(jid).get("Reason", "").startswith("Nodes_required"), 30, "the job to wait for nodes")
        st = status_text()
        assert re.search(rf"^{jid}\s+PENDING \(Nodes_required_for_job_are_DOWN", st, re.M), st
        assert f"job {jid} (PENDING): restart 0: Slurm is ending this job: node failure: tn2" in st, st
    finally:
        run_testbed("reboot", "tn2", nodes=2)  # the node comes back from a power cycle
    info = wait_ended(jid, 300)
    out = job_log(run, jid)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    assert len(resumes(run)) == 1
    losses_consistent(run)  # the steps lost with the node were trained again with the same losses
    assert (run / "ckpt_000080.pt").is_file()


def test_two_jobs_on_the_same_nodes_never_share_a_master_port(cluster2, demo):
    # Something already listens on the port the old scheme gave the next job (20000 + job id % 10000), as another
    # job's rank 0 would whose id is 10000 away; and a second job runs beside the first on the same nodes.
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    taken = 20000 + int(re.search(r"^NEXT_JOB_ID\s*=\s*(\d+)", out, re.M).group(1)) % 10000
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("0.0.0.0", taken))
        squatter.listen()
        runs = [cluster2 / "port a", cluster2 / "port b"]
        ids = [make_submit(r, demo, 20, "train.log_every=10", "train.ckpt_every=20", **TWO_NODES) for r in runs]
        infos = [wait_ended(j, 300) for j in ids]
    ports = []
    for r, j, info in zip(runs, ids, infos):
        assert info["JobState"] == "COMPLETED", job_log(r, j)
        ports.append(int(re.search(r"\| rendezvous tn1:(\d+) \|", (r / "train.log").read_text()).group(1)))
    assert taken not in ports and ports[0] != ports[1], (taken, ports)
    assert infos[1]["StartTime"] < infos[0]["EndTime"], "the two jobs did not share the nodes at the same time"


def test_slurm_refusals_are_shown_plainly(cluster2, demo, tmp_path):
    def submit(**env):
        return subprocess.run(["make", "-s", "submit", "PROFILE=local", "CONFIG=configs/tiny.yaml",
                               f"OUTDIR={tmp_path / 'r'}", f"ARGS={' '.join(data_args(demo))}"], cwd=REPO,
                              capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    three = submit(NODES="3", TASKS="1")  # a two-node partition
    assert three.returncode != 0 and "Traceback" not in three.stderr
    assert "submit: sbatch" in three.stderr and "Node count specification invalid" in three.stderr, three.stderr
    assert "NODES=3 asks for more nodes than partition low has" in three.stderr, three.stderr
    zero = submit(NODES="0")
    assert zero.returncode != 0 and "Traceback" not in zero.stderr
    assert "NODES >= 1" in zero.stderr, zero.stderr
    assert not squeue_ids()
