"""The submitit path: training jobs driven from Python (a notebook, a sweep, a job array).

    from jobs.submitit_launch import executor, TrainTask
    ex = executor("local", folder="runs/sweep/submitit")             # a profile name, as for make submit
    jobs = ex.map_array(TrainTask(), [["train.lr=1e-4", "train.outdir=runs/sweep/a"],
                                      ["train.lr=3e-4", "train.outdir=runs/sweep/b"]])
    [j.result() for j in jobs]                                        # 0 = every step done

or from the shell, with the same environment variables as make submit:
    PROFILE=local STEPS=400 OUTDIR=runs/x python -m jobs.submitit_launch [key=value ...]

How it survives preemption and time limits: submitit's worker (host Python, the srun task) starts training
through the profile's launcher as a child process. Submitit asks Slurm for `--signal=USR2@N` on the step, so at
preemption (where the cluster sets preempt_send_user_signal) and before the time limit USR2 reaches the worker
*and* training. Submitit's handler calls TrainTask.checkpoint(), which makes sure training got the signal (one
USR1 once training has logged its first line), waits until it has saved and exited with REQUEUE_EXIT (t2v/runlog.py), and returns a
DelayedSubmission of the same call; submitit then runs `scontrol requeue` and the next run resumes from OUTDIR.
Submitit ignores SIGTERM ("Bypassing signal SIGTERM") but training does not: where a cluster only sends SIGTERM
to the step at preemption, training still saves and exits with REQUEUE_EXIT, and TrainTask requeues the job itself with the
same host-side `scontrol requeue` as the job script. The restart cap is train.max_restarts (SLURM_RESTART_COUNT).

Why `make submit` uses the sbatch template (jobs/submit.py, templates/train.sbatch) and not this path:
  * requeueing must happen on the host. Submitit requeues from inside its worker with `scontrol`, which does not
    exist inside a container; the usual way to use submitit on Zaratan puts the whole worker in the container
    (`run.sh python ...`), where that call fails and the run is lost at the first preemption. The job script
    requeues from the batch shell on the host, whatever runs inside the container;
  * the job script is plain text the user can read, keep in the run folder and resubmit with `sbatch`; submitit
    needs its pickles, the same Python and submitit on the compute node, and a Python process that waits;
  * one requeue policy (jobs/policy.py: REQUEUE_EXIT + the SLURM_RESTART_COUNT cap) for every kind of stop, signalled or not.
This path keeps the worker on the host too (only training goes through the launcher), so it works with
containers as long as the host Python has this package and submitit.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import submitit

from jobs import policy, render
from jobs.profile import Profile, load_profile
from jobs.submit import REPO, resolve
from t2v import runlog  # the run contract: exit codes and markers (no torch)



def _log(msg: str) -> None:
    print(f"t2v-submitit: [{time.strftime('%F %T')}] {msg}", flush=True)


class TrainTask(submitit.helpers.Checkpointable):
    """Run `python -m t2v.train <args>` through the profile's launcher; requeue on REQUEUE_EXIT.

    State lives in the run's OUTDIR (checkpoints), not in this object, so checkpoint() resubmits the same call.
    `outdir` (the run's train.outdir) lets it wait for training's first log line before signalling it."""

    def __init__(self, launcher: Sequence[str] = (), python: str = sys.executable, workdir: str | None = None,
                 max_restarts: int = 20, env: Mapping[str, str] | None = None, outdir: str | None = None,
                 save_timeout_s: float = 120.0, ready_timeout_s: float = 600.0) -> None:
        self.launcher = [os.path.expanduser(w) for w in launcher]
        self.python = python
        self.workdir = workdir or str(REPO)
        self.max_restarts = max_restarts
        self.env = {k: os.path.expanduser(v) for k, v in (env or {}).items()}
        self.outdir = outdir
        self.save_timeout_s = save_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self._child: subprocess.Popen | None = None
        self._log_start = 0
        self._started = 0.0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_child"] = None  # a process handle does not survive pickling
        return state

    def __call__(self, train_args: Sequence[str] = ()) -> int:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        if restart > self.max_restarts:
            raise RuntimeError(f"restart cap {self.max_restarts} reached ({restart} restarts); not training")
        cmd = [*self.launcher, self.python, "-m", "t2v.train", *train_args]
        _log(f"restart {restart}: {' '.join(cmd)}")
        log = self._train_log()
        self._log_start = log.stat().st_size if log and log.is_file() else 0
        self._started = time.time()
        # USR1/USR2/TERM stay ignored in the child until Python installs its handlers (SIG_IGN survives exec).
        self._child = subprocess.Popen(["bash", "-c", 'trap "" USR1 USR2 TERM; exec "$@"', "t2v-task", *cmd],
                                       cwd=self.workdir, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                              **rendezvous(), **self.env})
        # killed by a signal: one during Python's exit can hit a run that had finished or saved
        rc = policy.normalise_rc(self._child.wait(), runlog.outcome(self._since_start()))
        # jobs/policy.py's table, as the job script applies it. Submitit ignores SIGTERM, so this worker never
        # sees the job "stopping": a time limit or scancel reaches training as a signal, and it saves (REQUEUE_EXIT).
        d = policy.decide(policy.Stop(rc, preempting=rc not in (0, runlog.REQUEUE_EXIT) and _preempted(),
                                      restart=restart, max_restarts=self.max_restarts))
        if d.action == "finish":
            _log(d.why)
            return 0
        if d.action == "stop":
            raise RuntimeError(f"{d.why}. Resume by resubmitting the same call (training continues from its OUTDIR)"
                               if d.exit_code == runlog.CAP_EXIT else d.why)
        # Training stopped for a requeue, but submitit's own signal never came (e.g. only SIGTERM was sent to
        # the step at preemption): rank 0 requeues from here, as the job script does.
        if int(os.environ.get("SLURM_PROCID", 0)) != 0:
            time.sleep(300)  # rank 0 requeues; Slurm then stops every task
            raise RuntimeError("training stopped for a requeue that did not come")
        _log(f"{d.why}; requeueing")
        _requeue()
        time.sleep(300)  # Slurm sends TERM (ignored by submitit) and then KILL within KillWait
        raise RuntimeError("requeued, but Slurm did not stop this run")

    def checkpoint(self, train_args: Sequence[str] = ()) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit's USR2 handler: let training save, then resubmit this same call."""
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        child = self._child
        if child is not None and _exit_code(child) is None:
            # Slurm's USR2 reached training too, unless it was still starting (then SIG_IGN dropped it). One
            # USR1 once it listens makes sure; never more, a late one could meet Python's exit-time defaults.
            while not self._ready() and _exit_code(child) is None:
                time.sleep(0.5)
            if _exit_code(child) is None:
                try:
                    child.send_signal(signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            deadline = time.time() + self.save_timeout_s
            while _exit_code(child) is None and time.time() < deadline:
                time.sleep(0.2)
        if child is not None:  # also when training, signalled by Slurm too, had already saved and exited
            # Popen.wait() in __call__ may have reaped it just before this handler ran, its status not yet stored
            # (_exit_code gives -1): then the log says whether it saved, as for any exit we cannot read.
            rc = policy.normalise_rc(_exit_code(child), runlog.outcome(self._since_start()))
            _log(f"training exited with code {rc} after the checkpoint signal")
        if restart >= self.max_restarts:
            _log(f"restart cap {self.max_restarts} reached; not requeueing")
            return None  # submitit then ends the job with "checkpoint function returned None"
        return submitit.helpers.DelayedSubmission(self, train_args)

    def _train_log(self) -> Path | None:
        return Path(self.outdir) / "train.log" if self.outdir else None

    def _since_start(self) -> list[str]:
        log = self._train_log()
        if log is None:
            return []
        try:
            with open(log, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def _ready(self) -> bool:
        """Training has installed its signal handlers: it logged its first line in this run."""
        if self._train_log() is None or time.time() - self._started > self.ready_timeout_s:
            return True
        return any(runlog.is_ready_line(line) for line in self._since_start())


def rendezvous() -> dict[str, str]:
    """MASTER_ADDR/MASTER_PORT for a job of several tasks, as the job script sets them: rank 0 on the job's first
    node, on a port it picks itself and passes on through the run folder (t2v/distributed.py)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    return {"MASTER_ADDR": submitit.JobEnvironment().hostnames[0], "MASTER_PORT": "0"}


def _exit_code(child: subprocess.Popen) -> int | None:
    """The child's exit code, or None while it runs. Not Popen.poll(): this runs in submitit's signal handler,
    which interrupts Popen.wait() while it holds the lock that poll() needs, so poll() would never see the exit."""
    if child.returncode is not None:
        return child.returncode
    try:
        pid, status = os.waitpid(child.pid, os.WNOHANG)
    except ChildProcessError:  # already reaped elsewhere
        return child.returncode if child.returncode is not None else -1
    if pid == 0:
        return None
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode


def _preempted() -> bool:
    """Slurm has decided to preempt this job (scontrol shows a PreemptTime)."""
    p = subprocess.run(["scontrol", "show", "job", os.environ.get("SLURM_JOB_ID", "")], capture_output=True, text=True)
    m = re.search(r"PreemptTime=(\S+)", p.stdout)
    return bool(m) and m.group(1) not in ("None", "Unknown")


def _requeue() -> None:
    job = os.environ.get("SLURM_JOB_ID", "")
    p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if p.returncode != 0 and "pending" not in (p.stderr + p.stdout).lower():
        raise RuntimeError(f"scontrol requeue {job} failed: {p.stderr.strip()}")


def executor(profile: str | Profile = "zaratan", folder: str | os.PathLike = "runs/submitit", *,
             gpus: int | None = None, nodes: int | None = None, time_min: int | None = None,
             partition: str | None = None, account: str | None = None, qos: str | None = None,
             **slurm_params: Any) -> submitit.SlurmExecutor:
    """A submitit SlurmExecutor with the profile's resources (GPUs per node, one task per GPU)."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    s = render.JobSettings("t2v", str(folder), str(REPO), partition=partition, account=account, qos=qos,
                           gpus=gpus, nodes=nodes)
    r = render.resources(prof, s)
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=10**6)  # our cap: train.max_restarts
    params: dict[str, Any] = dict(
        partition=r.partition or None, nodes=r.nodes, ntasks_per_node=r.tasks_per_node,
        cpus_per_task=r.cpus_per_task, time=time_min if time_min is not None else _minutes(r.time),
        signal_delay_s=prof.signal_before_s, job_name="t2v",
        additional_parameters={"requeue": True},  # scontrol requeue refuses jobs submitted with --no-requeue
    )
    if r.gpus:
        params["gpus_per_node"] = f"{prof.gpu_type}:{r.gpus}" if prof.gpu_type else r.gpus
    if r.account:
        params["account"] = r.account
    if r.qos:
        params["qos"] = r.qos
    if prof.mem:
        params["mem"] = prof.mem
    if prof.setup:
        params["setup"] = list(prof.setup)
    params.update(slurm_params)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def _minutes(t: str) -> int:
    """Slurm time (MM, HH:MM:SS, D-HH:MM:SS) -> minutes, rounded up."""
    days, _, hms = t.rpartition("-")
    parts = [int(x) for x in hms.split(":")]
    if len(parts) == 1:
        secs = parts[0] * 60
    else:
        parts = [0] * (3 - len(parts)) + parts
        secs = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return -(-(secs + int(days or 0) * 86400) // 60)


def task_for(profile: Profile, max_restarts: int = 20, outdir: str | None = None) -> TrainTask:
    python = profile.python
    if "/" in python and not os.path.isabs(python):
        python = str(REPO / python)
    launcher = [str(REPO / w) if "/" in w and not w.startswith(("/", "~")) else w for w in profile.launcher]
    return TrainTask(launcher, python, str(REPO), max_restarts, env=profile.env, outdir=outdir,
                     ready_timeout_s=profile.ready_timeout_s)


def launch(env: Mapping[str, str], overrides: Sequence[str] = ()) -> submitit.Job:
    """make-submit-style settings (environment + key=value) -> a running submitit job."""
    sub = resolve(env, overrides)
    s = sub.settings
    Path(s.run_dir).mkdir(parents=True, exist_ok=True)
    if sub.config_src:  # the job reads a copy, as with make submit
        shutil.copyfile(sub.config_src, Path(s.run_dir) / "job_config.yaml")
    ex = executor(sub.profile, Path(s.run_dir) / "submitit", gpus=s.gpus, nodes=s.nodes, partition=s.partition,
                  account=s.account, qos=s.qos, time_min=_minutes(s.time) if s.time else None)
    ex.update_parameters(job_name=s.job_name)
    return ex.submit(task_for(sub.profile, s.max_restarts, s.run_dir), list(s.train_args))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = launch(os.environ, argv)
    print(f"submitted job {job.job_id} (submitit); logs in {job.paths.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
