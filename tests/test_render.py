"""Job scripts (fast, no Slurm): golden files, quoting, multi-node directives, profiles, submit settings.

The golden files in tests/golden/ are the exact scripts for fixed inputs. After an intended change to
templates/*.sbatch or jobs/render.py, regenerate them and review the diff:

    T2V_REGEN_GOLDEN=1 .venv/bin/pytest tests/test_render.py -q && git diff tests/golden/
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import render, status
from jobs.profile import ProfileError, load_profile
from jobs.submit import SubmitError, main as submit_main, resolve, yaml_value
from t2v import config as C

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
NOW = dt.datetime(2025, 1, 2, 3, 4, 5)
TOKEN = "5f3a9c"  # the run folder's random part, fixed for golden files
HOME_REPO = "/home/user/t2v-slurm"  # the workdir in golden files (the real one depends on the checkout)
EVIL = "x $(touch {canary}); `touch {canary}` ; rm -rf ~ \"q\" 'z' #h %j"


def _sub(env: dict, *overrides: str, cwd: Path = REPO):
    sub = resolve({"T2V_PROFILES": "", **env}, overrides, cwd=cwd, now=NOW, token=TOKEN)
    return sub.profile, dataclasses.replace(sub.settings, workdir=HOME_REPO)


CASES = {
    "zaratan.sbatch": ({"PROFILE": "zaratan", "STEPS": "5000", "BS": "4"}, ()),
    "zaratan_2nodes_4gpus.sbatch": ({"PROFILE": "zaratan", "GPUS": "4", "NODES": "2", "TIME": "2-00:00:00",
                                     "ACCOUNT": "msml612-fa25-prj-eng", "JOB_NAME": "ddp"}, ("train.lr=3e-4",)),
    "local.sbatch": ({"PROFILE": "local", "CONFIG": "configs/tiny.yaml", "OUTDIR": "/tmp/t2v-runs/tiny",
                      "STEPS": "40"}, ("train.max_restarts=3",)),
}


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("T2V_REGEN_GOLDEN"):
        path.write_text(text)
    assert path.is_file(), f"{path} missing: regenerate with T2V_REGEN_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from the golden file (see this module's docstring)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_train_scripts(name):
    env, overrides = CASES[name]
    profile, settings = _sub(env, *overrides)
    _check_golden(name, render.render_train(profile, settings))


def test_golden_eval_script():
    profile, settings = _sub({"PROFILE": "zaratan"})
    _check_golden("zaratan_eval.sbatch", render.render_eval(profile, settings))


RENDER_IN_A_PROCESS = """
import dataclasses, json, sys, time
time.time = lambda: float(sys.argv[1])  # another clock in each process
from jobs import render
from jobs.profile import load_profile
from jobs.render import JobSettings
s = JobSettings(**json.loads(sys.argv[2]))
print(render.render_train(load_profile("zaratan", {"T2V_PROFILES": ""}), s), end="")
"""


def test_rendering_is_pure(tmp_path):
    """The same settings render the same script in processes with other clocks, time zones, working folders and
    environments (Slurm's and the baseline's variables included): nothing but the inputs reaches the text."""
    env, overrides = CASES["zaratan.sbatch"]
    profile, settings = _sub(env, *overrides)
    args = json.dumps(dataclasses.asdict(settings))
    outputs = []
    for clock, extra in ((0.0, {"TZ": "UTC"}),
                         (2e9, {"TZ": "Asia/Tokyo", "SLURM_JOB_ID": "77", "OUTDIR": "/elsewhere", "STEPS": "3",
                                "HOME": str(tmp_path), "USER": "someone", "PROFILE": "local"})):
        env_ = {k: v for k, v in os.environ.items() if k not in ("OUTDIR", "STEPS", "PROFILE", "SLURM_JOB_ID")}
        proc = subprocess.run([sys.executable, "-c", RENDER_IN_A_PROCESS, str(clock), args], cwd=REPO if clock else
                              tmp_path, env={**env_, **extra, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1] == render.render_train(profile, settings)


@pytest.mark.parametrize("name", sorted(CASES))
def test_scripts_parse_in_bash(name, tmp_path):
    env, overrides = CASES[name]
    profile, settings = _sub(env, *overrides)
    script = tmp_path / "s.sbatch"
    script.write_text(render.render_train(profile, settings))
    subprocess.run(["bash", "-n", str(script)], check=True)


def _sbatch_value(line: str) -> str:
    """What sbatch's directive parser reads from `#SBATCH --opt=VALUE` (double quotes, backslash escapes)."""
    arg = line.split("=", 1)[1]
    out, quoted, esc = [], False, False
    for ch in arg:
        if esc:
            out.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            break
        elif ch.isspace() and not quoted:
            break
        else:
            out.append(ch)
    return "".join(out)


def test_hostile_job_name_and_path_stay_literal(tmp_path):
    canary = tmp_path / "pwned"
    name = EVIL.format(canary=canary)
    run_dir = str(tmp_path / f"run dir; {EVIL.format(canary=canary)}")
    profile, settings = _sub({"PROFILE": "local", "JOB_NAME": name, "OUTDIR": run_dir, "STEPS": "7"})
    text = render.render_train(profile, settings)
    script = tmp_path / "s.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)

    # sbatch reads the directives back as the literal values
    directives = {l.split("=", 1)[0]: l for l in text.splitlines() if l.startswith("#SBATCH --")}
    assert _sbatch_value(directives["#SBATCH --job-name"]) == name
    assert _sbatch_value(directives["#SBATCH --output"]) == run_dir.replace("%", "%%") + "/slurm-%j.out"

    # every line bash executes holds the value only as a quoted word: run the assignments and compare
    body = [l for l in text.splitlines() if not l.startswith("#")]
    assigns = "\n".join(l for l in body if re.match(r"^(RUN_DIR|RESUME_HINT|TRAIN|LAUNCHER)=", l))
    out = subprocess.run(["bash", "-c", assigns + '\nprintf "%s\\n" "$RUN_DIR" "$RESUME_HINT" "${TRAIN[@]}"'],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.splitlines()
    assert out[0] == run_dir
    assert shlex.split(out[1]) == ["sbatch", f"{run_dir}/train.sbatch"]
    assert f"train.outdir={yaml_value(run_dir)}" in out[2:]
    assert not canary.exists(), "a substituted value was executed"
    for line in body:
        if "rm -rf" in line:
            assert "'" in line, line  # only ever inside single quotes
    # and the YAML quoting gives training the path back unchanged
    cfg = C.load_config(None, [a for a in out[2:] if a.startswith("train.outdir=")], env={})
    assert cfg.train.outdir == run_dir


def test_control_characters_are_refused():
    profile, settings = _sub({"PROFILE": "local", "OUTDIR": "/tmp/x"})
    with pytest.raises(render.RenderError):
        render.render_train(profile, dataclasses.replace(settings, job_name="a\nrm -rf ~"))


def test_multi_node_directives_and_rendezvous():
    profile, settings = _sub({"PROFILE": "zaratan", "GPUS": "4", "NODES": "2"})
    text = render.render_train(profile, settings)
    lines = text.splitlines()
    for d in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=a100:4",
              "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@300"):
        assert d in lines
    assert not any(l.startswith("#SBATCH --gpus=") for l in lines)
    assert "SRUN=(srun --nodes=2 --ntasks-per-node=4 --cpus-per-task=8 --kill-on-bad-exit=1 --unbuffered)" in lines
    assert any(l.startswith("MASTER_ADDR=$(scontrol show hostnames") for l in lines)
    assert "export MASTER_PORT=0" in lines  # rank 0 picks the port (t2v/distributed.py)
    # one node, one GPU: what Zaratan users write
    one = render.render_train(*_sub({"PROFILE": "zaratan"})).splitlines()
    assert "#SBATCH --gpus=a100:1" in one and "#SBATCH --nodes=1" in one
    # CPU profile: no GPU request at all
    assert not any("gpus" in l for l in render.render_train(*_sub({"PROFILE": "local"})).splitlines()
                   if l.startswith("#SBATCH"))


def test_requeue_logic_is_host_side():
    text = render.render_train(*_sub({"PROFILE": "zaratan"}))
    body = text.split("\nchild=$!\n", 1)[1]
    assert 'scontrol requeue "$SLURM_JOB_ID"' in body  # in the batch shell, after training exits
    assert 'LAUNCHER=("$HOME"/text2video/run.sh)' in text  # ~ expands on the host, quoted rest
    assert "kill -s USR1" in text and "kill -s TERM" not in text  # TERM to srun would SIGKILL the step


def test_submit_settings_from_environment(tmp_path):
    sub = resolve({"PROFILE": "local", "STEPS": "12", "BS": "3", "FRAMES": "4", "SIZE": "16", "LR": "0.002",
                   "MANIFEST": "data/m.jsonl", "JOB_NAME": "a b", "T2V_PROFILES": ""},
                  ["train.log_every=3"], cwd=tmp_path, now=NOW, token=TOKEN)
    s = sub.settings
    assert s.run_dir == str(REPO / "runs/slurm/a_b-20250102-030405-5f3a9c")
    args = list(s.train_args)
    assert f"train.outdir={s.run_dir}" in args
    assert {"train.steps=12", "train.batch_size=3", "data.frames=4", "data.size=16", "train.lr=0.002",
            "train.log_every=3", f"data.manifest={tmp_path / 'data/m.jsonl'}"} <= set(args)
    assert s.max_restarts == 20 and s.workdir == str(REPO)


def test_submissions_in_the_same_second_get_their_own_run_folders(tmp_path):
    env = {"PROFILE": "local", "T2V_PROFILES": ""}
    dirs = {resolve(env, [], cwd=tmp_path, now=NOW).settings.run_dir for _ in range(20)}
    assert len(dirs) == 20 and all(Path(d).name.startswith("t2v-20250102-030405-") for d in dirs)


def test_outdir_and_train_outdir_argument(tmp_path):
    a = resolve({"PROFILE": "local", "OUTDIR": "rel/run", "T2V_PROFILES": ""}, [], cwd=tmp_path).settings
    assert a.run_dir == str(tmp_path / "rel/run")
    b = resolve({"PROFILE": "local", "T2V_PROFILES": ""}, ["train.outdir=/tmp/o"], cwd=tmp_path).settings
    assert b.run_dir == "/tmp/o" and b.train_args.count("train.outdir=/tmp/o") == 1


def test_bad_settings_fail_before_submitting(tmp_path):
    with pytest.raises(SubmitError, match="unknown config key"):
        resolve({"PROFILE": "local", "T2V_PROFILES": ""}, ["train.stepz=3"], cwd=tmp_path)
    with pytest.raises(SubmitError, match="GPUS"):
        resolve({"PROFILE": "local", "GPUS": "two", "T2V_PROFILES": ""}, [], cwd=tmp_path)
    with pytest.raises(SubmitError, match="unknown profile"):
        resolve({"PROFILE": "nope", "T2V_PROFILES": ""}, [], cwd=tmp_path)
    with pytest.raises(SubmitError, match="CONFIG"):
        resolve({"PROFILE": "local", "CONFIG": "missing.yaml", "T2V_PROFILES": ""}, [], cwd=tmp_path)


def test_max_restarts_comes_from_the_config(tmp_path):
    s = resolve({"PROFILE": "local", "T2V_PROFILES": ""}, ["train.max_restarts=2"], cwd=tmp_path).settings
    assert s.max_restarts == 2
    assert "MAX_RESTARTS=2" in render.render_train(load_profile("local", {}), s).splitlines()


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("T2V_HOME", str(tmp_path / "home"))
    for k, v in {"PROFILE": "local", "DRY_RUN": "1", "OUTDIR": str(tmp_path / "run"), "STEPS": "9"}.items():
        monkeypatch.setenv(k, v)
    assert submit_main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n") and "train.steps=9" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "home").exists()


def test_eval_hook(tmp_path, capsys, monkeypatch):
    for k, v in {"PROFILE": "zaratan", "DRY_RUN": "1", "EVAL": "1", "OUTDIR": str(tmp_path / "run"),
                 "EVAL_ARGS": "--num 64 --no-fvd"}.items():
        monkeypatch.setenv(k, v)
    assert submit_main([]) == 0
    cap = capsys.readouterr()
    assert f"--dependency=afterok:<training job id>" in cap.err
    train, ev = cap.out.split(f"# ---- {tmp_path / 'run'}/eval.sbatch ----\n")
    assert (f"EVAL=(python -m t2v.eval --ckpt {tmp_path / 'run'} --manifest "
            "/scratch/data/manifests/test.manifest.processed.jsonl --num 64 --no-fvd)") in ev.splitlines()
    assert "#SBATCH --gpus=a100:1" in ev.splitlines() and "#SBATCH --requeue" not in ev


def test_user_profiles_are_found_without_code_changes(tmp_path):
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "mylab.yaml").write_text("base: zaratan\npartition: gpu-h100\ngpu_type: h100\naccount: lab-prj\n")
    prof = load_profile("mylab", {"T2V_PROFILES": str(d)})
    assert (prof.partition, prof.gpu_type, prof.account, prof.launcher) == (
        "gpu-h100", "h100", "lab-prj", ("~/text2video/run.sh",))
    (d / "bad.yaml").write_text("partiton: gpu\n")
    with pytest.raises(ProfileError, match="unknown key"):
        load_profile("bad", {"T2V_PROFILES": str(d)})
    assert load_profile(str(d / "mylab.yaml"), {}).name == "mylab"


def test_shipped_profiles():
    z = load_profile("zaratan", {})
    assert (z.partition, z.gpus, z.gpu_type, z.launcher) == ("gpu", 1, "a100", ("~/text2video/run.sh",))
    assert z.runs_root.startswith("/scratch") and z.env["HF_HOME"].startswith("/scratch")
    local = load_profile("local", {})
    assert local.partition == "low" and local.gpus == 0 and local.launcher == ("tests/slurm/container.sh",)


def test_container_wrapper_hides_slurm_clients():
    out = subprocess.run(["bash", str(REPO / "tests/slurm/container.sh"), "bash", "-c",
                          "for c in scontrol sbatch squeue scancel srun; do command -v $c; done; echo end"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "end"


def test_status_parsers(tmp_path):
    jobs = status.parse_scontrol(
        "JobId=7 JobName=x UserId=root(0) JobState=PENDING Reason=BeginTime Dependency=(null) Requeue=1 "
        "Restarts=2 BatchFlag=1\nJobId=8 JobName=y JobState=COMPLETED Reason=None Restarts=0\n")
    assert jobs["7"].state == "PENDING" and jobs["7"].restarts == 2 and jobs["8"].state == "COMPLETED"
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("Out: x\nstep 000005 | loss 0.5000\nsaved x/ckpt_000005.pt\n"
                                   "step 000010 | loss 0.2500\nresumed from x at step 10 (restart 1)\n")
    assert status.last_step(run) == (10, "0.2500")
    rec = {"job_id": "7", "run_dir": str(run), "log": str(run / "slurm-7.out")}
    (run / "slurm-7.out").write_text("t2v-job: [2025-01-01 00:00:00] job 7 restart 1: starting\n")
    assert status.restarts_from_log(rec["log"]) == 1
    t = status.table([rec], {"7": jobs["7"]})
    assert re.search(r"^7\s+PENDING \(BeginTime\)\s+2\s+10\s+0.2500\s+" + re.escape(str(run)), t, re.M)


def test_status_says_how_each_job_that_is_not_running_stopped(tmp_path):
    def rec(jid, log_lines, train_lines=()):
        run = tmp_path / f"run{jid}"
        run.mkdir()
        (run / f"slurm-{jid}.out").write_text("".join(f"t2v-job: [2026-12-03 10:00:00] job {jid} {l}\n"
                                                      for l in log_lines) + "srun: error: noise\n")
        (run / "train.log").write_text("".join(f"{l}\n" for l in ("Out: x", *train_lines)))
        return {"job_id": jid, "run_dir": str(run), "log": str(run / f"slurm-{jid}.out")}
    recs = [
        rec("1", ["restart 0: starting on tn[1-2] in x", "restart 0: training finished"]),
        rec("2", ["restart 0: starting on tn[1-2] in x"]),
        rec("3", ["restart 0: starting on tn[1-2] in x",
                  "restart 0: training failed with exit code 137; not requeueing. Fix the cause, then resume with: s"],
            ["step 000010 | loss 0.5000", "error: rank 0 on tn1: another rank closed its connection"]),
        rec("4", ["restart 0: starting on tn[1-2] in x",
                  "restart 0: Slurm is ending this job: node failure: tn2 not responding; Slurm requeues it"]),
        rec("5", ["restart 0: starting on tn[1-2] in x"]),
    ]
    infos = {"1": status.JobInfo("COMPLETED", 0), "2": status.JobInfo("RUNNING", 0),
             "3": status.JobInfo("FAILED", 0), "4": status.JobInfo("PENDING", 1, "Nodes_required_for_job_are_DOWN"),
             "5": status.JobInfo("NODE_FAIL", 0)}
    lines = status.stopped(recs, infos)
    assert lines == [
        "how the jobs that are not running stopped last:",
        "  job 3 (FAILED): restart 0: training failed with exit code 137; not requeueing. Fix the cause, then resume "
        "with: s",
        "    error: rank 0 on tn1: another rank closed its connection",
        "  job 4 (PENDING): restart 0: Slurm is ending this job: node failure: tn2 not responding; Slurm requeues it",
        "  job 5 (NODE_FAIL): restart 0: starting on tn[1-2] in x ... then ended without a word from the job script "
        "(killed; Slurm's log says why)",
    ]
    assert status.stopped(recs[:2], infos) == []  # running and completed jobs need no explanation


def test_runs_are_recorded_for_status(tmp_path, monkeypatch):
    from jobs.submit import record
    monkeypatch.setenv("T2V_HOME", str(tmp_path))
    record({"job_id": "5", "run_dir": "/r"})
    assert status.records() == [{"job_id": "5", "run_dir": "/r"}]
    assert status.find_run("5")["run_dir"] == "/r"
    assert json.loads((tmp_path / "runs.jsonl").read_text())["job_id"] == "5"


def test_status_reads_metrics_jsonl_and_config_yaml(tmp_path):
    """Step and loss come from metrics.jsonl when there is one (its last loss record, events and a cut last
    line skipped); the target step from config.yaml's train.steps, not from any other `steps:` key."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("step 000010 | loss 0.2500\n")  # stale prose: metrics.jsonl wins
    recs = [{"step": 10, "loss": 0.25, "time": 1.0}, {"step": 20, "loss": 0.123456, "time": 2.0},
            {"event": "checkpoint", "step": 20, "path": "x"}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + '\n{"step": 30, "lo')
    assert status.last_step(run) == (20, "0.1235")
    (run / "config.yaml").write_text("eval:\n  steps: 50\ntrain:\n  outdir: x\n  steps: 40\n")
    assert status.total_steps(run) == 40
    (run / "config.yaml").write_text("train: [\n")  # half-written: no target rather than a crash
    assert status.total_steps(run) is None
    assert re.search(r"^7\s+\?\s+-\s+20\s+0.1235\s+", status.table([{"job_id": "7", "run_dir": str(run)}], {}), re.M)


def test_the_latent_recipe_submits_unchanged(tmp_path):
    """`make submit CONFIG=configs/latent.yaml STEPS=5000`: the same renderer and job script, the recipe's config
    travelling with the run (nothing about the VAE is needed before the job starts)."""
    sub = resolve({"PROFILE": "zaratan", "CONFIG": "configs/latent.yaml", "STEPS": "5000", "T2V_PROFILES": ""}, [],
                  cwd=REPO, now=NOW, token=TOKEN)
    args = list(sub.settings.train_args)
    assert args[:2] == ["--config", f"{sub.settings.run_dir}/job_config.yaml"] and "train.steps=5000" in args
    assert sub.config_src == str(REPO / "configs/latent.yaml")
    script = render.render_train(sub.profile, sub.settings)
    assert "python -m t2v.train --config" in script.replace("'", "")


@pytest.mark.parametrize("part", ["array", "merge"])
def test_golden_cache_scripts(part):
    """make cache-submit SHARDS=3: the array of shards and its merge job, through the same profile and renderer."""
    from jobs import cache_submit

    sub, shards, array, merge = cache_submit.scripts(
        {"PROFILE": "zaratan", "SHARDS": "3", "T2V_PROFILES": "", "CONFIG": "configs/latent.yaml"}, [],
        cwd=REPO, now=NOW, token=TOKEN)
    text = (array if part == "array" else merge).replace(str(REPO), HOME_REPO)
    _check_golden(f"zaratan_cache_{part}.sbatch", text)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert ("#SBATCH --array=0-2" in text) == (part == "array") and "--gpus" not in text
    assert ('--shard "$SLURM_ARRAY_TASK_ID/3"' in text) == (part == "array") and ("--merge 3" in text) == (part == "merge")


def test_cache_submit_refuses_bad_shard_counts():
    from jobs import cache_submit

    for bad in ("", "0", "two"):
        with pytest.raises(SubmitError, match="SHARDS must be a whole number"):
            cache_submit.scripts({"PROFILE": "local", "SHARDS": bad, "T2V_PROFILES": ""})


def test_submit_help_lists_every_setting_it_reads_from_the_environment(capsys):
    """Every environment variable jobs/submit.py (and the profile lookup it calls) reads is in ENV_SETTINGS, and
    `python -m jobs.submit --help` prints each with what it sets."""
    import jobs.submit as submit_mod

    source = "".join((REPO / "jobs" / f).read_text() for f in ("submit.py", "profile.py"))
    read = set(re.findall(r'env(?:\.get\(|\[)"([A-Z][A-Z0-9_]+)"', source))
    read |= set(re.findall(r'_(?:int|opt)\(env, "([A-Z][A-Z0-9_]+)"\)', source)) | set(submit_mod.TRAIN_VARS)
    assert read and read <= set(submit_mod.ENV_SETTINGS), sorted(read - set(submit_mod.ENV_SETTINGS))
    with pytest.raises(SystemExit):
        submit_mod.main(["--help"])
    out = capsys.readouterr().out
    assert all(re.search(rf"^  {var} +\S", out, re.M) for var in submit_mod.ENV_SETTINGS), out
