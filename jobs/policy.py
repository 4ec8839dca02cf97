"""The requeue policy: what a job does when training exits, as one table of cases.

Both ways a run reaches Slurm follow it: the sbatch job script (bash on the host, rendered from
templates/train.sbatch: its `decide` function is generated from this module by ``bash_decide()``) and the
submitit worker (jobs/submitit_launch.py calls ``decide``). tests/test_policy.py runs every row of CASES through
both, so the two cannot drift apart.

Inputs, as the job sees them once training has exited:
  rc          training's exit code, after ``normalise_rc`` (a kill during Python's exit counts as what its log says)
  stopping    the job shell itself got SIGTERM (Slurm is ending the job: scancel, time limit, end of a grace time)
  reason      Slurm's Reason for the job (``TimeLimit`` when the time limit ended it)
  preempting  Slurm has set a PreemptTime: the job is being preempted
  restart     SLURM_RESTART_COUNT; ``max_restarts`` is train.max_restarts
"""
from __future__ import annotations

from dataclasses import dataclass

from t2v.runlog import CAP_EXIT, REQUEUE_EXIT


@dataclass(frozen=True)
class Stop:
    rc: int
    stopping: bool = False
    reason: str = ""
    preempting: bool = False
    restart: int = 0
    max_restarts: int = 20


@dataclass(frozen=True)
class Decision:
    action: str  # "finish" | "requeue" | "stop"
    exit_code: int  # the job's own exit code
    why: str


def normalise_rc(rc: int, outcome: str) -> int:
    """A process killed by a signal (rc > 128 in bash, < 0 from Python) during its exit had already finished
    (``outcome == "done"``) or saved for a requeue (``"requeue"``), as its log says; otherwise rc stands."""
    if rc > 128 or rc < 0:
        return {"done": 0, "requeue": REQUEUE_EXIT}.get(outcome, rc)
    return rc


def decide(s: Stop) -> Decision:
    if s.rc == 0:
        return Decision("finish", 0, "training finished")
    if s.stopping:
        if s.reason != "TimeLimit":
            # Cancelled (scancel), or the end of a preemption grace time: Slurm requeues a preempted job itself.
            who = "preemption: Slurm requeues it" if s.preempting else "cancelled"
            return Decision("stop", s.rc, f"Slurm is ending this job ({who}); training exited with code {s.rc}")
        why = f"time limit reached (training exited with code {s.rc})"
    elif s.rc == REQUEUE_EXIT:
        why = "checkpoint saved"
    elif s.preempting:
        # Preempted while training could not save (e.g. still starting). Slurm does not requeue a job that ends
        # within its grace time, so the job requeues itself; training resumes from its last checkpoint.
        why = f"training exited with code {s.rc} while the job is being preempted"
    else:
        return Decision("stop", s.rc, f"training failed with exit code {s.rc}; not requeueing")
    if s.restart >= s.max_restarts:
        return Decision("stop", CAP_EXIT, f"{why}; restart cap {s.max_restarts} reached; not requeueing")
    return Decision("requeue", 0, why)


# The table: every case a job meets, and what it must do. (name, inputs, expected action, expected exit code)
CASES = [
    ("finished", Stop(0), "finish", 0),
    ("finished, then a signal during Python's exit", Stop(normalise_rc(138, "done")), "finish", 0),
    ("saved after a signal", Stop(REQUEUE_EXIT, restart=3), "requeue", 0),
    ("saved, then killed during Python's exit", Stop(normalise_rc(137, "requeue")), "requeue", 0),
    ("saved at the restart cap", Stop(REQUEUE_EXIT, restart=20), "stop", CAP_EXIT),
    ("saved past the restart cap", Stop(REQUEUE_EXIT, restart=25), "stop", CAP_EXIT),
    ("preempted while starting (could not save)", Stop(1, preempting=True), "requeue", 0),
    ("preempted while starting at the cap", Stop(143, preempting=True, restart=2, max_restarts=2), "stop", CAP_EXIT),
    ("time limit", Stop(REQUEUE_EXIT, stopping=True, reason="TimeLimit"), "requeue", 0),
    ("time limit, training killed", Stop(137, stopping=True, reason="TimeLimit", restart=1), "requeue", 0),
    ("cancelled with scancel", Stop(REQUEUE_EXIT, stopping=True, reason="None"), "stop", REQUEUE_EXIT),
    ("end of a preemption grace time", Stop(143, stopping=True, preempting=True), "stop", 143),
    ("training failed", Stop(1), "stop", 1),
    ("bad config or data", Stop(2, restart=4), "stop", 2),
    ("killed by the OOM killer", Stop(normalise_rc(137, "")), "stop", 137),
]


def bash_decide() -> str:
    """``decide`` as a bash function for the job script: `decide RC STOPPING REASON PREEMPTING RESTART MAX` sets
    $action, $code and $why. STOPPING and PREEMPTING are empty for false."""
    return f"""decide() {{
  local rc=$1 stopping=$2 reason=$3 preempting=$4 restart=$5 max=$6
  action=requeue; code=0
  if [ "$rc" = 0 ]; then
    action=finish; why="training finished"; return 0
  elif [ -n "$stopping" ]; then
    if [ "$reason" != TimeLimit ]; then
      local who=cancelled
      [ -n "$preempting" ] && who="preemption: Slurm requeues it"
      action=stop; code=$rc; why="Slurm is ending this job ($who); training exited with code $rc"
      return 0
    fi
    why="time limit reached (training exited with code $rc)"
  elif [ "$rc" = {REQUEUE_EXIT} ]; then
    why="checkpoint saved"
  elif [ -n "$preempting" ]; then
    why="training exited with code $rc while the job is being preempted"
  else
    action=stop; code=$rc; why="training failed with exit code $rc; not requeueing"; return 0
  fi
  if (( restart >= max )); then
    action=stop; code={CAP_EXIT}; why="$why; restart cap $max reached; not requeueing"
  fi
  return 0
}}"""
