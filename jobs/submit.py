"""`make submit`: render the training job for a cluster profile and hand it to sbatch.

Settings come from environment variables, exactly as `make submit STEPS=5000 GPUS=4 ...` passes them:
  training:  STEPS BS FRAMES SIZE LR MANIFEST OUTDIR CONFIG, plus key=value arguments (ARGS="train.lr=3e-4 ...")
  the job:   PROFILE (default $T2V_PROFILE, else zaratan) PARTITION GPUS (per node) NODES TIME ACCOUNT QOS
             TASKS (processes per node: one per GPU by default; TASKS=2 on a CPU node runs 2 gloo ranks)
             JOB_NAME DRY_RUN=1 (print the script, submit nothing) EVAL=1 (queue an evaluation job after it:
             `python -m t2v.eval --ckpt <run folder> --manifest EVAL_MANIFEST [EVAL_ARGS]`, started by Slurm
             only once training has finished all its steps: --dependency=afterok)

The run folder is OUTDIR if given, else <profile runs_root>/<JOB_NAME>-<timestamp>. It receives the rendered
script (train.sbatch), a copy of the config (job_config.yaml), Slurm's log (slurm-<jobid>.out, appended across
requeues) and everything training writes (train.log, metrics.jsonl, ckpt_*.pt). The config is loaded and
validated here, so a typo fails in a second instead of after a night in the queue. Each submission is recorded
in $T2V_HOME/runs.jsonl (default ~/.t2v/runs.jsonl) for `make status`.

Path: this is the sbatch-template path (templates/train.sbatch), the one `make submit` uses; jobs/submitit_launch.py
is the Python/sweep path. See jobs/submitit_launch.py for why make submit does not use submitit.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from jobs import render
from jobs.profile import Profile, ProfileError, load_profile
from t2v import config
from t2v.files import slug

REPO = Path(__file__).resolve().parent.parent

# The baseline's training variables -> config keys (the same table as t2v.config.ENV_VARS).
TRAIN_VARS = dict(config.ENV_VARS)
PATH_KEYS = {"data.manifest", "train.outdir", "data.cache_dir", "text.cache_dir", "data.video_root"}
TRUE = {"1", "true", "yes", "on"}

# Every environment variable this command reads, as `--help` lists them (tests/test_render.py checks the list is
# complete); the training ones are the baseline's (t2v.config.ENV_VARS).
ENV_SETTINGS = {
    **{var: f"training: {key}" for var, key in config.ENV_VARS.items()},
    "CONFIG": "training: the YAML config file (copied into the run folder as job_config.yaml)",
    "PROFILE": "the cluster profile (default $T2V_PROFILE, else zaratan)",
    "T2V_PROFILE": "the default profile when PROFILE is not set",
    "T2V_PROFILES": "more folders to find profiles in (before ~/.config/t2v/profiles and jobs/profiles)",
    "PARTITION": "the Slurm partition (default: the profile's)",
    "GPUS": "GPUs per node",
    "NODES": "nodes (>= 1)",
    "TASKS": "processes per node (default one per GPU; TASKS=2 on a CPU node runs 2 gloo ranks)",
    "TIME": "the time limit, e.g. 08:00:00",
    "ACCOUNT": "the Slurm account to charge",
    "QOS": "the Slurm QOS",
    "JOB_NAME": "the job's name and the run folder's prefix (default t2v)",
    "DRY_RUN": "1: print the job script, submit nothing",
    "EVAL": "1: queue an evaluation job after training (--dependency=afterok)",
    "EVAL_MANIFEST": "the manifest the evaluation job scores against",
    "EVAL_ARGS": "more arguments for python -m t2v.eval",
    "T2V_HOME": "where runs.jsonl records each submission for make status (default ~/.t2v)",
    "SLURM_CONF": "the Slurm configuration sbatch is run with (the test cluster sets it)",
}


class SubmitError(RuntimeError):
    pass


@dataclass(frozen=True)
class Submission:
    profile: Profile
    settings: render.JobSettings
    config_src: str | None  # the user's config file, copied into the run folder on submit
    eval: bool
    dry_run: bool


def t2v_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("T2V_HOME") or "~/.t2v").expanduser()


def yaml_value(text: str) -> str:
    """A string as a YAML scalar that load_config reads back unchanged (paths may hold ': ', '#', quotes)."""
    if re.fullmatch(r"[A-Za-z0-9_./~+-][A-Za-z0-9_./~+@=,-]*", text) and text.lower() not in (
            "true", "false", "yes", "no", "on", "off", "null", "~"):
        try:
            float(text)
        except ValueError:
            return text
    return "'" + text.replace("'", "''") + "'"


def _abs(path: str, cwd: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (cwd / p).resolve())


def _int(env: Mapping[str, str], var: str) -> int | None:
    v = env.get(var, "").strip()
    if not v:
        return None
    if not re.fullmatch(r"\d+", v):
        raise SubmitError(f"{var} must be a whole number, got {v!r}")
    return int(v)


def _opt(env: Mapping[str, str], var: str) -> str | None:
    v = env.get(var, "").strip()
    return v or None


def resolve(env: Mapping[str, str], overrides: Sequence[str] = (), *, cwd: Path | None = None,
            now: _dt.datetime | None = None, profile: str | None = None, token: str | None = None) -> Submission:
    """Environment + key=value arguments -> a validated Submission. Reads files (profile, config), no Slurm.
    Without OUTDIR the run folder is ``<job>-<date>-<time>-<token>``: the random token keeps two submissions in the
    same second apart (``token`` fixes it for golden files)."""
    cwd = Path(cwd or os.getcwd())
    now = now or _dt.datetime.now()
    try:
        prof = load_profile(profile or env.get("PROFILE") or env.get("T2V_PROFILE") or None, env)
    except ProfileError as e:
        raise SubmitError(str(e)) from None
    job_name = env.get("JOB_NAME", "").strip() or "t2v"

    config_src = env.get("CONFIG", "").strip() or None
    if config_src:
        config_src = _abs(config_src, cwd)
        if not Path(config_src).is_file():
            raise SubmitError(f"CONFIG: file not found: {config_src}")

    # key=value arguments; train.outdir among them counts as OUTDIR.
    extra, outdir = [], env.get("OUTDIR", "").strip() or None
    for arg in overrides:
        key, eq, value = arg.partition("=")
        if not eq:
            raise SubmitError(f"argument {arg!r}: expected key=value, e.g. train.steps=5000")
        if key.strip() == "train.outdir":
            outdir = value.strip().strip("'\"") or outdir
        else:
            extra.append(arg)

    if outdir:
        run_dir = _abs(outdir, cwd)
    else:
        root = Path(prof.runs_root).expanduser()
        root = root if root.is_absolute() else REPO / root
        token = secrets.token_hex(3) if token is None else token
        run_dir = str(root / f"{slug(job_name, default='t2v')}-{now:%Y%m%d-%H%M%S}-{token}")

    train_over = [f"train.outdir={yaml_value(run_dir)}"]
    for var, key in TRAIN_VARS.items():
        v = env.get(var, "").strip()
        if var == "OUTDIR" or not v:
            continue
        train_over.append(f"{key}={yaml_value(_abs(v, cwd))}" if key in PATH_KEYS else f"{key}={v}")
    # Validate now (unknown keys, bad values) with exactly what the job will pass; env={} so nothing leaks in.
    job_config = f"{run_dir}/job_config.yaml" if config_src else None
    try:
        cfg = config.load_config(config_src, [*train_over, *extra], env={})
    except config.ConfigError as e:
        raise SubmitError(f"config: {e}") from None
    if prof.manifest and not env.get("MANIFEST", "").strip() and cfg.data.manifest == config.DataConfig().manifest:
        train_over.append(f"data.manifest={yaml_value(prof.manifest)}")

    train_args = (*(("--config", job_config) if job_config else ()), *train_over, *extra)
    settings = render.JobSettings(
        job_name=job_name, run_dir=run_dir, workdir=str(REPO), train_args=tuple(train_args),
        max_restarts=cfg.train.max_restarts, partition=_opt(env, "PARTITION"), account=_opt(env, "ACCOUNT"),
        qos=_opt(env, "QOS"), time=_opt(env, "TIME"), gpus=_int(env, "GPUS"), nodes=_int(env, "NODES"),
        tasks=_int(env, "TASKS"),
    )
    render.resources(prof, settings)  # GPUS/NODES sanity
    want_eval = env.get("EVAL", "").strip().lower() in TRUE
    if want_eval:
        eval_manifest = env.get("EVAL_MANIFEST", "").strip()
        eval_manifest = _abs(eval_manifest, cwd) if eval_manifest else prof.eval_manifest
        try:
            extra_eval = shlex.split(env.get("EVAL_ARGS", ""))
        except ValueError as e:
            raise SubmitError(f"EVAL_ARGS: {e}") from None
        settings = replace(settings, eval_args=(*(("--manifest", eval_manifest) if eval_manifest else ()),
                                                *extra_eval))
    return Submission(prof, settings, config_src, eval=want_eval,
                      dry_run=env.get("DRY_RUN", "").strip().lower() in TRUE)


def _sbatch(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise SubmitError(f"{cmd[0]} not found: run this on a Slurm login node (or start the test cluster: "
                          "make slurm-up, then export the SLURM_CONF it prints)")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SubmitError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    out = p.stdout.strip().splitlines()
    if not out or not re.match(r"^\d+", out[-1]):
        raise SubmitError(f"{shlex.join(cmd)}: no job id in its output: {p.stdout!r}")
    return out[-1].split(";")[0]


def record(entry: dict, env: Mapping[str, str] | None = None) -> Path:
    path = t2v_home(env) / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return path


def describe(sub: Submission) -> str:
    r = render.resources(sub.profile, sub.settings)
    gpus = f"{r.nodes * r.gpus} GPU(s) = {r.nodes} node(s) x {r.gpus}" if r.gpus else f"{r.nodes} node(s), no GPU"
    return (f"profile {sub.profile.name}, partition {r.partition or '(default)'}, {gpus}, time {r.time}, "
            f"restart cap {sub.settings.max_restarts}")


def submit(sub: Submission, env: Mapping[str, str] | None = None, out=None) -> dict:
    out = out or sys.stdout
    s = sub.settings
    script = render.render_train(sub.profile, s)
    eval_script = render.render_eval(sub.profile, s) if sub.eval else None
    eval_path = f"{s.run_dir}/eval.sbatch"
    if sub.dry_run:  # the script alone on stdout (redirect it to a file and it is the job); notes on stderr
        info = sys.stderr if out is sys.stdout else out
        print(f"DRY_RUN: nothing submitted ({describe(sub)})", file=info)
        print(f"would write {s.script_path} and run: {shlex.join(render.sbatch_command(s.script_path))}", file=info)
        print(script, end="", file=out)
        if eval_script:
            dep = render.sbatch_command(eval_path, "afterok:<training job id>")
            print(f"EVAL=1: would also write {eval_path} and run: {shlex.join(dep)}", file=info)
            print(f"# ---- {eval_path} ----", file=out)
            print(eval_script, end="", file=out)
        return {}
    run = Path(s.run_dir)
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SubmitError(f"cannot create the run folder {run}: {e} (set OUTDIR=..., or runs_root in the "
                          f"profile {sub.profile.source})") from None
    if sub.config_src:
        shutil.copyfile(sub.config_src, run / "job_config.yaml")
    Path(s.script_path).write_text(script)
    try:
        job_id = _sbatch(render.sbatch_command(s.script_path))
    except SubmitError as e:
        r = render.resources(sub.profile, s)
        if "Node count specification invalid" in str(e) and r.nodes > 1:
            raise SubmitError(f"{e}\n  NODES={r.nodes} asks for more nodes than partition {r.partition or '(default)'} "
                              f"has, or allows one job: `sinfo -p {r.partition or '<partition>'}` lists them") from None
        raise
    eval_id = None
    if eval_script:
        Path(eval_path).write_text(eval_script)
        eval_id = _sbatch(render.sbatch_command(eval_path, f"afterok:{job_id}"))
    entry = {
        "job_id": job_id, "eval_job_id": eval_id, "run_dir": s.run_dir, "job_name": s.job_name,
        "profile": sub.profile.name, "script": s.script_path, "log": f"{s.run_dir}/slurm-{job_id}.out",
        "submitted": _dt.datetime.now().isoformat(timespec="seconds"),
        "slurm_conf": (env or os.environ).get("SLURM_CONF", ""),
    }
    record(entry, env)
    print(f"submitted job {job_id} ({describe(sub)})", file=out)
    print(f"  run folder: {s.run_dir}", file=out)
    print(f"  job log:    {entry['log']}", file=out)
    print(f"  train log:  {s.run_dir}/train.log", file=out)
    if eval_id:
        print(f"  eval job:   {eval_id} (starts after {job_id} completes; log {s.run_dir}/eval-{eval_id}.out)", file=out)
    print(f"  follow: make logs RUN={job_id}   status: make status   cancel: make cancel RUN={job_id}", file=out)
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    width = max(map(len, ENV_SETTINGS))
    p = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="settings from the environment (make submit VAR=value ... passes them):\n" +
                                "\n".join(f"  {var:<{width}}  {what}" for var, what in ENV_SETTINGS.items()))
    p.add_argument("--profile", default=None, help="cluster profile (default: $PROFILE, $T2V_PROFILE, zaratan)")
    p.add_argument("--dry-run", action="store_true", help="print the job script, submit nothing (= DRY_RUN=1)")
    p.add_argument("--eval", action="store_true", help="queue an evaluation job after training (= EVAL=1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = p.parse_args(argv)
    env = dict(os.environ)
    if args.dry_run:
        env["DRY_RUN"] = "1"
    if args.eval:
        env["EVAL"] = "1"
    try:
        sub = resolve(env, args.overrides, profile=args.profile)
        submit(sub, env)
    except (SubmitError, render.RenderError) as e:
        print(f"submit: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
