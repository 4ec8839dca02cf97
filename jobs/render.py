"""Job scripts as a pure function: (profile, settings) -> text. No clock, no environment, no file system
except reading the template, so the same inputs always give the same script (tests/golden/ pins them).

Every substituted value is quoted for the reader that will see it:
  * lines that bash runs get `shlex.quote` (a leading `~/` becomes "$HOME"/...), so a job name or path holding
    spaces, `;` or `$(rm -rf ~)` stays one literal word;
  * `#SBATCH` lines are comments to bash and are read by sbatch's own parser, which knows double quotes and
    backslashes but not single quotes, so they get double quotes with `\\` and `"` escaped;
  * a value with a newline or another control character is refused: it could end a comment line.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from jobs import policy
from jobs.profile import Profile
from t2v import runlog

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_SAFE_DIRECTIVE = re.compile(r"^[A-Za-z0-9_./:=,@+%-]+$")


class RenderError(ValueError):
    pass


@dataclass(frozen=True)
class JobSettings:
    """One submission, fully resolved by jobs.submit (absolute paths, config already validated).
    Resource fields left as None take the profile's value."""

    job_name: str
    run_dir: str  # the run folder: training's OUTDIR, the job's log, the rendered script
    workdir: str  # the job's working directory: the repository root (so `python -m t2v.train` imports)
    train_args: tuple = ()  # arguments after `python -m t2v.train`
    max_restarts: int = 20
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    gpus: int | None = None  # per node
    nodes: int | None = None
    tasks: int | None = None  # training processes per node; None = one per GPU, one on a CPU node
    eval_args: tuple = ()  # EVAL=1: arguments after `python -m t2v.eval --ckpt <run_dir>`

    @property
    def script_path(self) -> str:
        return f"{self.run_dir.rstrip('/')}/train.sbatch"


@dataclass(frozen=True)
class Resources:
    partition: str
    account: str
    qos: str
    time: str
    gpus: int  # per node
    nodes: int
    tasks_per_node: int
    cpus_per_task: int


def resources(profile: Profile, s: JobSettings) -> Resources:
    pick = lambda v, d: d if v is None else v  # noqa: E731
    gpus, nodes = int(pick(s.gpus, profile.gpus)), int(pick(s.nodes, profile.nodes))
    if gpus < 0 or nodes < 1:
        raise RenderError(f"GPUS must be >= 0 and NODES >= 1 (got GPUS={gpus} NODES={nodes})")
    tasks = max(gpus, 1) if s.tasks is None else int(s.tasks)
    if tasks < 1 or (gpus and tasks != gpus):
        raise RenderError(f"TASKS (processes per node) must be >= 1 and equal GPUS on a GPU node "
                          f"(got TASKS={tasks} GPUS={gpus})")
    return Resources(
        partition=str(pick(s.partition, profile.partition)),
        account=str(pick(s.account, profile.account)),
        qos=str(pick(s.qos, profile.qos)),
        time=str(pick(s.time, profile.time)),
        gpus=gpus,
        nodes=nodes,
        tasks_per_node=tasks,  # one training process per GPU (DDP); TASKS=N runs N gloo ranks on a CPU node
        cpus_per_task=profile.cpus_per_task,
    )


# --- quoting -------------------------------------------------------------------------------------------

def _check(value: object) -> str:
    text = str(value)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise RenderError(f"refusing a value with a newline or control character: {text!r}")
    return text


def sh(value: object) -> str:
    """One shell word that means exactly `value`; `~/x` keeps its meaning as the job's home."""
    text = _check(value)
    if text == "~":
        return '"$HOME"'
    if text.startswith("~/"):
        rest = text[2:]
        return '"$HOME"/' + shlex.quote(rest) if rest else '"$HOME"/'
    return shlex.quote(text)


def sh_words(values: Iterable[object]) -> str:
    return " ".join(sh(v) for v in values)


def directive(option: str, value: object | None = None) -> str:
    """An `#SBATCH` line, quoted for sbatch's parser (double quotes, backslash escapes)."""
    if value is None:
        return f"#SBATCH {_check(option)}"
    text = _check(value)
    if not _SAFE_DIRECTIVE.match(text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"#SBATCH {_check(option)}={text}"


def _extra_directive(opt: str) -> str:
    key, eq, value = _check(opt).partition("=")
    return directive(key, value) if eq else directive(key)


def slurm_filename(path: str) -> str:
    """A literal path for --output: `%` is a Slurm pattern character, so it is doubled."""
    return path.replace("%", "%%")


# --- rendering -----------------------------------------------------------------------------------------

def fill(template: str, values: dict[str, str]) -> str:
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise RenderError(f"template placeholders without a value: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _gpu_directives(r: Resources, profile: Profile) -> list[str]:
    if r.gpus == 0:
        return []
    spec = f"{profile.gpu_type}:{r.gpus}" if profile.gpu_type else str(r.gpus)
    # One node: --gpus=a100:1 (what Zaratan users write). Several: a per-node count, same on each node.
    return [directive("--gpus" if r.nodes == 1 else "--gpus-per-node", spec)]


def _resource_directives(r: Resources, profile: Profile) -> list[str]:
    lines = [directive("--partition", r.partition)] if r.partition else []
    if r.account:
        lines.append(directive("--account", r.account))
    if r.qos:
        lines.append(directive("--qos", r.qos))
    return lines


def _srun_args(r: Resources, tasks_per_node: int, nodes: int) -> str:
    return sh_words([f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
                     f"--cpus-per-task={r.cpus_per_task}", "--kill-on-bad-exit=1", "--unbuffered"])


def _env_lines(profile: Profile) -> str:
    return "\n".join(f"export {k}={sh(v)}" for k, v in sorted(profile.env.items()))


def _setup_lines(profile: Profile) -> str:
    return "\n".join(_check(line) for line in profile.setup)


def train_command(profile: Profile, s: JobSettings) -> list[str]:
    return [profile.python, "-m", "t2v.train", *s.train_args]


def _directives(r: Resources, profile: Profile, s: JobSettings, job_name: str, log_name: str,
                requeue: bool) -> list[str]:
    """The #SBATCH lines of a job; a training job also asks to be requeued and for the time-limit warning."""
    return [
        directive("--job-name", job_name),
        *_resource_directives(r, profile),
        directive("--time", r.time),
        directive("--nodes", r.nodes),
        directive("--ntasks-per-node", r.tasks_per_node),
        directive("--cpus-per-task", r.cpus_per_task),
        *_gpu_directives(r, profile),
        *([directive("--mem", profile.mem)] if profile.mem else []),
        *([directive("--requeue")] if requeue else []),
        directive("--open-mode", "append"),
        *([directive("--signal", f"B:USR1@{profile.signal_before_s}")] if requeue else []),
        directive("--output", slurm_filename(s.run_dir.rstrip("/")) + "/" + log_name),
        directive("--chdir", s.workdir),
        *(_extra_directive(o) for o in profile.sbatch_extra),
    ]


def render_train(profile: Profile, s: JobSettings, template: str | None = None) -> str:
    r = resources(profile, s)
    d = _directives(r, profile, s, s.job_name, "slurm-%j.out", requeue=True)
    values = {
        "profile": sh(profile.name),
        "directives": "\n".join(d),
        "run_dir": sh(s.run_dir),
        "max_restarts": str(int(s.max_restarts)),
        "resume_hint": sh("sbatch " + shlex.quote(s.script_path)),
        "launcher": sh_words(profile.launcher),
        "train": sh_words(train_command(profile, s)),
        "srun_args": _srun_args(r, r.tasks_per_node, r.nodes),
        "env": _env_lines(profile),
        "setup": _setup_lines(profile),
        "ready_timeout_s": str(int(profile.ready_timeout_s)),
        # the run contract (t2v/runlog.py) and the requeue policy (jobs/policy.py), never copies of them
        **{name: sh(pattern) for name, pattern in runlog.MARKERS.items()},
        "requeue_exit": str(runlog.REQUEUE_EXIT),
        "cap_exit": str(runlog.CAP_EXIT),
        "decide": policy.bash_decide(),
    }
    text = template if template is not None else (TEMPLATES / "train.sbatch").read_text()
    return fill(text, values)


def render_eval(profile: Profile, s: JobSettings, template: str | None = None) -> str:
    """The EVAL=1 hook: one task on one GPU (if the profile has GPUs) evaluating the run's checkpoints."""
    r = resources(profile, s)
    one = Resources(r.partition, r.account, r.qos, profile.eval_time, min(r.gpus, 1), 1, 1, r.cpus_per_task)
    d = _directives(one, profile, s, f"{s.job_name}-eval", "eval-%j.out", requeue=False)
    values = {
        "profile": sh(profile.name),
        "directives": "\n".join(d),
        "run_dir": sh(s.run_dir),
        "launcher": sh_words(profile.launcher),
        "eval": sh_words([profile.python, "-m", "t2v.eval", "--ckpt", s.run_dir, *s.eval_args]),
        "srun_args": _srun_args(one, 1, 1),
        "env": _env_lines(profile),
        "setup": _setup_lines(profile),
    }
    text = template if template is not None else (TEMPLATES / "eval.sbatch").read_text()
    return fill(text, values)


# what `make cache-submit KIND=...` builds: the command, and whether it runs on a GPU (the VAE encoder does)
CACHE_KINDS = {"clips": (("t2v.data", "cache"), False), "latents": (("t2v.data", "latents"), True),
               "text": (("t2v.text", "embed"), True)}


def render_cache(profile: Profile, s: JobSettings, shards: int, merge: bool, kind: str = "clips",
                 template: str | None = None) -> str:
    """A sharded cache build (templates/cache.sbatch): the array of ``shards`` tasks, or its merge job, one task
    each. Clips decode on CPU (the profile's cache_partition; the task's CPUs become decoding processes); latents
    and captions run their encoder on the profile's GPU (GPUS=0 for CPU). The merge job never needs a GPU."""
    if shards < 1:
        raise RenderError(f"SHARDS must be >= 1 (got {shards})")
    if kind not in CACHE_KINDS:
        raise RenderError(f"KIND must be one of {', '.join(CACHE_KINDS)} (got {kind!r})")
    (module, command), on_gpu = CACHE_KINDS[kind]
    r = resources(profile, s)
    gpus = min(r.gpus, 1) if on_gpu and not merge else 0
    cpu_default = profile.cache_partition if not gpus else ""
    partition = r.partition if s.partition is not None else (cpu_default or r.partition)
    time = r.time if s.time is not None else (profile.cache_time or r.time)
    one = Resources(partition, r.account, r.qos, time, gpus, 1, 1, r.cpus_per_task)
    name, log_name = (f"{s.job_name}-merge", "cache-merge-%j.out") if merge else (s.job_name, "cache-%A_%a.out")
    d = _directives(one, profile, s, name, log_name, requeue=False)
    workers = f"--workers {one.cpus_per_task} " if kind == "clips" else ""
    if not merge:
        d.insert(1, directive("--array", f"0-{shards - 1}"))
    values = {
        "profile": sh(profile.name),
        "what": f"{kind}, merge of {shards} shards" if merge else f"{kind}, shard $SLURM_ARRAY_TASK_ID of {shards}",
        "directives": "\n".join(d),
        "launcher": sh_words(profile.launcher),
        "cache": sh_words([profile.python, "-m", module, command, *s.train_args]),
        "part": f"--merge {shards}" if merge else f'{workers}--shard "$SLURM_ARRAY_TASK_ID/{shards}"',
        "srun_args": _srun_args(one, 1, 1),
        "env": _env_lines(profile),
        "setup": _setup_lines(profile),
    }
    text = template if template is not None else (TEMPLATES / "cache.sbatch").read_text()
    return fill(text, values)


def sbatch_command(script: str, dependency: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    cmd = ["sbatch", "--parsable", *extra]
    if dependency:
        cmd.append(f"--dependency={dependency}")
    return [*cmd, script]
