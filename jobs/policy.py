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
  requeueing  Slurm is requeueing the job itself: its Restarts count is ahead of this run's (scontrol requeue,
              a node failure; for these Slurm sends TERM, so `stopping` is set too)
  lost_nodes  the job's nodes that Slurm sees as not responding, down or failed ("tn2"; "" when all answer)
"""
from __future__ import annotations

from dataclasses import dataclass

from t2v.runlog import CAP_EXIT, NO_SPACE_EXIT, REQUEUE_EXIT


@dataclass(frozen=True)
class Stop:
    rc: int
    stopping: bool = False
    reason: str = ""
    preempting: bool = False
    restart: int = 0
    max_restarts: int = 20
    requeueing: bool = False
    lost_nodes: str = ""


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


def ending(s: Stop) -> str:
    """Why Slurm is ending a job whose shell got SIGTERM, as the job log says it."""
    if s.lost_nodes:
        return f"node failure: {s.lost_nodes} not responding; Slurm requeues it"
    if s.reason == "TimeLimit":
        return "time limit"
    if s.preempting:
        return "preemption: Slurm requeues it"
    if s.requeueing:
        return "scontrol requeue: Slurm requeues it"
    return "cancelled"


def decide(s: Stop) -> Decision:
    if s.rc == 0:
        return Decision("finish", 0, "training finished")
    if s.stopping:
        if s.reason != "TimeLimit":
            # Cancelled (scancel), or Slurm requeues the job itself: the end of a preemption grace time,
            # scontrol requeue, a node that stopped responding (NODE_FAIL, with --requeue and JobRequeue=1).
            return Decision("stop", s.rc, f"Slurm is ending this job ({ending(s)}); training exited with code {s.rc}")
        why = f"time limit reached (training exited with code {s.rc})"
    elif s.rc == REQUEUE_EXIT:
        why = "checkpoint saved"
    elif s.rc == NO_SPACE_EXIT:
        # A requeue would meet the same full disk or quota at its first save, and again, up to the restart cap.
        return Decision("stop", s.rc, NO_SPACE_WHY)
    elif s.lost_nodes:
        # A rank lost its peers on a node Slurm already sees as gone: not our code's fault, so it may run again
        # (resuming from the last checkpoint) once Slurm has other nodes. A crash with every node up does not.
        why = f"training exited with code {s.rc} after node(s) {s.lost_nodes} stopped responding"
    elif s.preempting:
        # Preempted while training could not save (e.g. still starting). Slurm does not requeue a job that ends
        # within its grace time, so the job requeues itself; training resumes from its last checkpoint.
        why = f"training exited with code {s.rc} while the job is being preempted"
    else:
        return Decision("stop", s.rc, f"training failed with exit code {s.rc}; not requeueing")
    if s.restart >= s.max_restarts:
        return Decision("stop", CAP_EXIT, f"{why}; restart cap {s.max_restarts} reached; not requeueing")
    return Decision("requeue", 0, why)


NO_SPACE_WHY = ("training found no room to write (a full disk or quota; train.log's last line says where); not "
                "requeueing: free space, then submit the same command again")

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
    ("scontrol requeue", Stop(REQUEUE_EXIT, stopping=True, reason="None", requeueing=True), "stop", REQUEUE_EXIT),
    ("node failure (NODE_FAIL: Slurm requeues)", Stop(137, stopping=True, requeueing=True, lost_nodes="tn2"),
     "stop", 137),
    ("a rank lost its peers on a node Slurm sees down", Stop(1, lost_nodes="tn2", restart=1), "requeue", 0),
    ("lost a node at the restart cap", Stop(1, lost_nodes="tn2", restart=3, max_restarts=3), "stop", CAP_EXIT),
    ("a rank crashed or hung, every node up", Stop(1, restart=1), "stop", 1),
    ("training failed", Stop(1), "stop", 1),
    ("bad config or data", Stop(2, restart=4), "stop", 2),
    ("no room to write (full disk, quota)", Stop(NO_SPACE_EXIT, restart=1), "stop", NO_SPACE_EXIT),
    ("no room to write, while being preempted", Stop(NO_SPACE_EXIT, preempting=True), "stop", NO_SPACE_EXIT),
    ("killed by the OOM killer", Stop(normalise_rc(137, "")), "stop", 137),
]


def bash_decide() -> str:
    """``ending`` and ``decide`` as bash functions for the job script: `decide RC STOPPING REASON PREEMPTING RESTART
    MAX REQUEUEING LOST_NODES` sets $action, $code and $why; `ending REASON PREEMPTING REQUEUEING LOST_NODES`
    prints why Slurm is ending the job. STOPPING, PREEMPTING and REQUEUEING are empty for false."""
    return f"""ending() {{
  local reason=$1 preempting=$2 requeueing=$3 lost=$4
  if [ -n "$lost" ]; then echo "node failure: $lost not responding; Slurm requeues it"
  elif [ "$reason" = TimeLimit ]; then echo "time limit"
  elif [ -n "$preempting" ]; then echo "preemption: Slurm requeues it"
  elif [ -n "$requeueing" ]; then echo "scontrol requeue: Slurm requeues it"
  else echo cancelled; fi
}}
decide() {{
  local rc=$1 stopping=$2 reason=$3 preempting=$4 restart=$5 max=$6 requeueing=${{7:-}} lost=${{8:-}}
  action=requeue; code=0
  if [ "$rc" = 0 ]; then
    action=finish; why="training finished"; return 0
  elif [ -n "$stopping" ]; then
    if [ "$reason" != TimeLimit ]; then
      action=stop; code=$rc
      why="Slurm is ending this job ($(ending "$reason" "$preempting" "$requeueing" "$lost")); training exited with code $rc"
      return 0
    fi
    why="time limit reached (training exited with code $rc)"
  elif [ "$rc" = {REQUEUE_EXIT} ]; then
    why="checkpoint saved"
  elif [ "$rc" = {NO_SPACE_EXIT} ]; then
    action=stop; code=$rc; why="{NO_SPACE_WHY}"; return 0
  elif [ -n "$lost" ]; then
    why="training exited with code $rc after node(s) $lost stopped responding"
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
