"""The requeue policy (jobs/policy.py) as a table: every case, through the Python decision (the submitit path)
and through the bash function the sbatch job script runs, rendered from the same module."""
from __future__ import annotations

import subprocess

import pytest

from jobs import policy
from jobs.profile import load_profile
from jobs.render import JobSettings, render_train
from t2v import runlog


def bash(stop: policy.Stop) -> policy.Decision:
    script = policy.bash_decide() + '\ndecide "$@"; printf "%s\\n%s\\n%s" "$action" "$code" "$why"'
    args = [str(stop.rc), "1" if stop.stopping else "", stop.reason, "2026-12-01T10:00:00" if stop.preempting else "",
            str(stop.restart), str(stop.max_restarts), "1" if stop.requeueing else "", stop.lost_nodes]
    out = subprocess.run(["bash", "-c", script, "decide", *args], capture_output=True, text=True, check=True).stdout
    action, code, why = out.split("\n", 2)
    return policy.Decision(action, int(code), why)


@pytest.mark.parametrize("name,stop,action,code", policy.CASES, ids=[c[0] for c in policy.CASES])
def test_each_case_decides_the_same_in_python_and_in_the_job_script(name, stop, action, code):
    d = policy.decide(stop)
    assert (d.action, d.exit_code) == (action, code), name
    assert bash(stop) == d


def test_the_table_covers_every_outcome():
    outcomes = {(c[2], c[3]) for c in policy.CASES}
    assert {("finish", 0), ("requeue", 0), ("stop", runlog.CAP_EXIT), ("stop", runlog.REQUEUE_EXIT)} <= outcomes
    whys = " / ".join(policy.decide(c[1]).why for c in policy.CASES)
    for words in ("training finished", "checkpoint saved", "restart cap", "being preempted", "time limit",
                  "cancelled", "preemption: Slurm requeues it", "training failed", "node failure: tn2 not responding",
                  "scontrol requeue: Slurm requeues it", "after node(s) tn2 stopped responding"):
        assert words in whys


def test_a_signal_during_pythons_exit_counts_as_what_the_log_says():
    assert policy.normalise_rc(138, runlog.outcome(["step 000010 | loss 0.5", "done: 10 steps in x"])) == 0
    assert policy.normalise_rc(-9, runlog.outcome([f"signal SIGUSR1 at step 4: {runlog.REQUEUE_MARK}"])) == 75
    assert policy.normalise_rc(137, runlog.outcome(["step 000010 | loss 0.5"])) == 137
    assert policy.normalise_rc(1, "done") == 1  # a plain exit code is never reinterpreted


def test_the_job_script_carries_the_contract_not_copies_of_it():
    script = render_train(load_profile("local", {"T2V_PROFILES": ""}), JobSettings("t", "/tmp/r", "/tmp/w"))
    assert policy.bash_decide() in script
    for pattern in runlog.MARKERS.values():
        assert pattern in script
    assert f"rc={runlog.REQUEUE_EXIT}" in script and f"exit {runlog.CAP_EXIT}" in script
    body = script.replace(policy.bash_decide(), "")
    assert "saving and exiting" not in body.replace(runlog.MARKERS["requeue_re"], "")
    assert '"done: ' not in body and "'^done: '" not in body.replace(runlog.MARKERS["done_re"], "")
