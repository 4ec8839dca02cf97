"""`make status` / `make logs` / `make cancel`: my runs, as one table.

  python -m jobs.status                 # job id, Slurm state, restarts, last logged step and loss, run folder,
                                        # then how each job that is not running stopped last, in its log's words
  python -m jobs.status --all           # every recorded run, not only the latest 20
  python -m jobs.status --follow RUN    # follow a run's job log across requeues (RUN: job id or run folder)
  python -m jobs.status --cancel RUN    # scancel the run's job (and its evaluation job)

"My runs" are the submissions recorded by jobs.submit in $T2V_HOME/runs.jsonl (default ~/.t2v/runs.jsonl).
The state comes from `scontrol show job` (jobs Slurm still remembers: running, pending, recently ended), then
`sacct` where accounting is enabled; restarts from scontrol, else from the job log; step and loss from the run's
metrics.jsonl (t2v.runlog, appended to across requeues), else from train.log for runs from before it existed, and the
target step from the run's config.yaml.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import yaml

from jobs.submit import t2v_home
from t2v import runlog
from t2v.table import text_table

STEP_RE = re.compile(rf"^{re.escape(runlog.STEP_PREFIX)}(\d+) \| loss ([-+0-9.eEnaif]+)")  # train.log's step lines
RESTART_RE = re.compile(r"^t2v-job: \[[^]]*\] job \S+ restart (\d+): ?(.*)$")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT"}


@dataclass
class JobInfo:
    state: str = "?"
    restarts: int | None = None
    reason: str = ""


def records(env: Mapping[str, str] | None = None) -> list[dict]:
    path = t2v_home(env) / "runs.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _run(cmd: Sequence[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def parse_scontrol(text: str) -> dict[str, JobInfo]:
    """`scontrol show job -o` output (one job per line) -> {job id: JobInfo}."""
    jobs = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            restarts = fields.get("Restarts", "")
            jobs[fields["JobId"]] = JobInfo(fields.get("JobState", "?"),
                                            int(restarts) if restarts.isdigit() else None, fields.get("Reason", ""))
    return jobs


def query(job_ids: Iterable[str]) -> dict[str, JobInfo]:
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    found = parse_scontrol(_run(["scontrol", "show", "job", "-o"]) or "")
    missing = [j for j in ids if j not in found]
    if missing:  # forgotten by slurmctld (MinJobAge): ask accounting, when there is any
        out = _run(["sacct", "-n", "-P", "-X", "-o", "JobIDRaw,State", "-j", ",".join(missing)]) or ""
        for line in out.splitlines():
            jid, _, state = line.partition("|")
            if jid in missing:
                found[jid] = JobInfo(state.split()[0] if state else "?")
    return {j: found[j] for j in ids if j in found}


def last_step(run_dir: str | Path) -> tuple[int | None, str]:
    """The last loss record of the run: step and loss as train.log prints it (4 decimals)."""
    for rec in reversed(runlog.read_records(run_dir)):  # metrics.jsonl, in the order written
        if "event" not in rec and isinstance(rec.get("step"), int) and isinstance(rec.get("loss"), (int, float)):
            return rec["step"], f"{rec['loss']:.4f}"
    # no metrics.jsonl, or no loss in it yet: the text log, which is all that runs from before metrics.jsonl have
    log = Path(run_dir) / "train.log"
    if not log.is_file():
        return None, ""
    step, loss = None, ""
    with open(log, errors="replace") as f:
        for line in f:
            m = STEP_RE.match(line)
            if m:
                step, loss = int(m.group(1)), m.group(2)
    return step, loss


def total_steps(run_dir: str | Path) -> int | None:
    """train.steps of the config.yaml training saved in the run folder, or None."""
    path = Path(run_dir) / "config.yaml"
    try:
        return int(yaml.safe_load(path.read_text())["train"]["steps"])
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError):  # absent, half-written or not training's
        return None


def restarts_from_log(log: str | Path) -> int | None:
    p = Path(log)
    if not p.is_file():
        return None
    found = [int(m.group(1)) for line in p.read_text(errors="replace").splitlines() if (m := RESTART_RE.match(line))]
    return max(found) if found else None


def table(recs: list[dict], infos: Mapping[str, JobInfo]) -> str:
    rows = []
    for r in recs:
        info = infos.get(r["job_id"], JobInfo())
        restarts = info.restarts if info.restarts is not None else restarts_from_log(r.get("log", ""))
        step, loss = last_step(r["run_dir"])
        total = total_steps(r["run_dir"])
        step_s = "-" if step is None else (f"{step}/{total}" if total else str(step))
        state = info.state + (f" ({info.reason})" if info.state == "PENDING" and info.reason not in ("", "None") else "")
        rows.append((r["job_id"], state, "-" if restarts is None else str(restarts), step_s, loss or "-",
                     r["run_dir"]))
    return text_table(("JOB", "STATE", "RESTARTS", "STEP", "LOSS", "RUN"), rows)


def last_word(log: str | Path) -> str:
    """The job script's last line in the job log ("restart 1: Slurm is ending this job: node failure ..."), or ""."""
    p = Path(log)
    if not p.is_file():
        return ""
    last = ""
    for line in p.read_text(errors="replace").splitlines():
        if m := RESTART_RE.match(line):
            last = f"restart {m.group(1)}: {m.group(2)}"
    return last


def training_error(run_dir: str | Path) -> str:
    """The error that stopped training: the last line of train.log ("error: ..."), else the ``error`` event that
    ends metrics.jsonl (a run that found the disk full may have had room for one and not the other)."""
    log = Path(run_dir) / "train.log"
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    if lines and lines[-1].startswith("error: "):
        return lines[-1]
    records = runlog.read_records(run_dir)
    last = records[-1] if records else {}
    return f"error: {last.get('error', '')}" if last.get("event") == runlog.ERROR else ""


def stopped(recs: list[dict], infos: Mapping[str, JobInfo]) -> list[str]:
    """How each job that is not running or done stopped last: the job script's words and training's last error.
    (A job waiting again after a node failure shows Slurm's reason in the table's STATE.)"""
    out = []
    for r in recs:
        info = infos.get(r["job_id"], JobInfo())
        word = last_word(r.get("log", ""))
        starting = word.partition(": ")[2].startswith("starting on ")
        if info.state in ("RUNNING", "COMPLETED") or not word or (starting and info.state not in ENDED):
            continue
        if starting:  # the job script was killed before it could say anything
            word += " ... then ended without a word from the job script (killed; Slurm's log says why)"
        out.append(f"  job {r['job_id']} ({info.state}): {word}")
        err = training_error(r["run_dir"])
        if err and info.state in ENDED:
            out.append(f"    {err}")
    return ["how the jobs that are not running stopped last:", *out] if out else []


def find_run(run: str, env: Mapping[str, str] | None = None) -> dict:
    """A job id or a run folder -> its newest record (or a record made up from the folder)."""
    recs = records(env)
    run = run.strip()
    if not run:
        raise SystemExit("give RUN=<job id or run folder> (see `make status`)")
    if re.fullmatch(r"\d+", run):
        for r in reversed(recs):
            if r["job_id"] == run or r.get("eval_job_id") == run:
                return r
        raise SystemExit(f"no recorded run with job id {run} (see `make status`)")
    path = str(Path(run).expanduser().resolve())
    for r in reversed(recs):
        if str(Path(r["run_dir"]).resolve()) == path:
            return r
    if Path(path).is_dir():
        logs = sorted(Path(path).glob("slurm-*.out"), key=lambda p: p.stat().st_mtime)
        jid = logs[-1].name[len("slurm-"):-len(".out")] if logs else ""
        return {"job_id": jid, "run_dir": path, "log": str(logs[-1]) if logs else ""}
    raise SystemExit(f"{run}: neither a recorded job id nor a run folder")


def follow(rec: dict, poll: float = 0.5, lines: int = 40, out=sys.stdout, stop_after: float | None = None) -> int:
    """Print the job log's last lines, then everything appended to it, until the job has ended. The log is
    appended across requeues (--open-mode=append), so one file tells the whole story of a job."""
    log = Path(rec.get("log") or Path(rec["run_dir"]) / "train.log")
    if not rec.get("log") and rec.get("job_id"):
        log = Path(rec["run_dir"]) / f"slurm-{rec['job_id']}.out"
    print(f"==> {log} (job {rec.get('job_id') or '?'}; Ctrl-C stops following)", file=out, flush=True)
    pos, started, last_check, ended_at = 0, time.time(), 0.0, None
    try:
        while True:
            if log.is_file():
                with open(log, errors="replace") as f:
                    if pos == 0 and lines:
                        text = f.read()
                        print("".join(text.splitlines(keepends=True)[-lines:]), end="", file=out, flush=True)
                    else:
                        f.seek(pos)
                        text = f.read()
                        print(text, end="", file=out, flush=True)
                    pos = f.tell()
            now = time.time()
            if now - last_check >= 3:
                last_check = now
                info = query([rec.get("job_id", "")]).get(rec.get("job_id", ""))
                if info is None or info.state.split("+")[0] in ENDED:
                    ended_at = ended_at or now
                    if now - ended_at >= 2 * poll:  # one more read after the end, for the last lines
                        if info is not None:
                            print(f"==> job {rec['job_id']} {info.state}", file=out, flush=True)
                        return 0
                else:
                    ended_at = None
            if stop_after is not None and now - started > stop_after:
                return 0
            time.sleep(poll)
    except KeyboardInterrupt:
        return 0


def cancel(rec: dict, out=sys.stdout) -> int:
    ids = [j for j in (rec.get("job_id"), rec.get("eval_job_id")) if j]
    if not ids:
        print(f"no job id known for {rec['run_dir']}", file=sys.stderr)
        return 1
    if shutil.which("scancel") is None:
        print("scancel not found: run this where Slurm's commands are", file=sys.stderr)
        return 1
    p = subprocess.run(["scancel", *ids], capture_output=True, text=True)
    if p.returncode != 0:
        print(f"scancel {' '.join(ids)} failed: {p.stderr.strip()}", file=sys.stderr)
        return p.returncode
    print(f"cancelled job(s) {', '.join(ids)}; checkpoints stay in {rec['run_dir']} "
          f"(resume: sbatch {rec.get('script') or Path(rec['run_dir']) / 'train.sbatch'})", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.status", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--follow", metavar="RUN", help="follow the job log of RUN (job id or run folder)")
    g.add_argument("--cancel", metavar="RUN", help="cancel RUN (job id or run folder)")
    p.add_argument("--all", action="store_true", help="every recorded run (default: the latest 20)")
    p.add_argument("-n", "--lines", type=int, default=40, help="--follow: lines of history to show first")
    args = p.parse_args(argv)
    if args.follow is not None:
        return follow(find_run(args.follow), lines=args.lines)
    if args.cancel is not None:
        return cancel(find_run(args.cancel))
    recs = records()
    if not recs:
        print(f"no runs recorded yet in {t2v_home() / 'runs.jsonl'} (make submit ...)")
        return 0
    recs = recs if args.all else recs[-20:]
    infos = query(r["job_id"] for r in recs)
    print(table(recs, infos))
    for line in stopped(recs, infos):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
