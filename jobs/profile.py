"""Cluster profiles: one YAML file per cluster, found by name, so a new cluster needs no code.

Search order for `PROFILE=name` (first hit wins):
  1. every folder in $T2V_PROFILES (colon-separated)
  2. ~/.config/t2v/profiles/
  3. jobs/profiles/ (shipped: zaratan, local)
`PROFILE` may also be a path to a .yaml file. A profile may start from another with `base: zaratan` and
change only a few keys. Unknown keys fail loudly and list the valid ones.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from t2v.config import read_yaml_mapping

SHIPPED = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "zaratan"


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    """Everything cluster-specific. Paths may start with `~/` (the job's $HOME); relative paths are relative
    to the repository root, which is the job's working directory."""

    name: str
    partition: str = ""
    account: str = ""  # empty: Slurm's default account for the user
    qos: str = ""
    time: str = "01:00:00"  # --time for a training job (each requeued run gets it again)
    signal_before_s: int = 120  # --signal=B:USR1@N: the time-limit warning; Slurm may send it up to 60 s early
    gpus: int = 0  # GPUs per node (GPUS=...); 0 = CPU job
    gpu_type: str = ""  # "a100" -> --gpus=a100:1; empty -> --gpus=1
    nodes: int = 1
    cpus_per_task: int = 1
    mem: str = ""  # --mem per node, e.g. 64G; empty = partition default
    launcher: tuple = ()  # the container wrapper every command runs through, e.g. ~/text2video/run.sh
    python: str = "python"  # the interpreter as seen through the launcher
    runs_root: str = "runs"  # run folders: <runs_root>/<job name>-<timestamp> unless OUTDIR is given
    manifest: str = ""  # default MANIFEST when neither MANIFEST nor the config names one
    env: Mapping[str, str] = field(default_factory=dict)  # exported in the job (values quoted)
    sbatch_extra: tuple = ()  # more #SBATCH options, each one "--key=value"
    setup: tuple = ()  # shell lines run before training, verbatim (module loads); the profile is trusted code
    ready_timeout_s: int = 600  # signals wait for training's first log line at most this long
    eval_time: str = "01:00:00"
    cache_partition: str = ""  # `make cache-submit` (CPU decoding): this partition; empty = partition
    cache_time: str = ""  # --time per cache shard; empty = time
    eval_manifest: str = ""  # EVAL=1: the test manifest for `python -m t2v.eval` (EVAL_MANIFEST overrides)
    source: str = ""  # the file it came from (filled in by load_profile)


FIELDS = {f.name: f for f in dataclasses.fields(Profile) if f.name != "source"}


def search_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if env is None else env
    dirs = [Path(p).expanduser() for p in env.get("T2V_PROFILES", "").split(os.pathsep) if p]
    dirs.append(Path("~/.config/t2v/profiles").expanduser())
    dirs.append(SHIPPED)
    return dirs


def available(env: Mapping[str, str] | None = None) -> dict[str, Path]:
    """name -> file of every profile that PROFILE=name would find (earlier folders shadow later ones)."""
    found: dict[str, Path] = {}
    for d in search_dirs(env):
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                found.setdefault(p.stem, p)
    return found


def find_profile(name: str, env: Mapping[str, str] | None = None) -> Path:
    p = Path(name).expanduser()
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        if p.is_file():
            return p
        raise ProfileError(f"profile file not found: {p}")
    for d in search_dirs(env):
        cand = d / f"{name}.yaml"
        if cand.is_file():
            return cand
    names = ", ".join(sorted(available(env))) or "none"
    where = ", ".join(str(d) for d in search_dirs(env))
    raise ProfileError(f"unknown profile {name!r}; available: {names} (searched {where})")


def _coerce(key: str, value: Any, where: str) -> Any:
    f = FIELDS[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if value is None:
        return default
    if isinstance(default, bool) or (isinstance(default, int) and not isinstance(default, bool)):
        if isinstance(value, bool) or not str(value).strip().lstrip("-").isdigit():
            raise ProfileError(f"{where}: {key} must be an integer, got {value!r}")
        return int(value)
    if isinstance(default, tuple):
        if isinstance(value, str):
            return tuple(shlex.split(value)) if key == "launcher" else (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
            raise ProfileError(f"{where}: {key} must be a list of strings")
        return tuple(str(v) for v in value)
    if isinstance(default, Mapping):
        if not isinstance(value, Mapping):
            raise ProfileError(f"{where}: {key} must be a mapping of NAME: value")
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, (dict, list)):
        raise ProfileError(f"{where}: {key} must be a single value")
    return str(value)


def load_profile(name: str | None = None, env: Mapping[str, str] | None = None, _seen: tuple = ()) -> Profile:
    env = os.environ if env is None else env
    name = name or env.get("T2V_PROFILE") or DEFAULT_PROFILE
    path = find_profile(name, env)
    if path.resolve() in _seen:
        raise ProfileError(f"{path}: `base:` chain loops back to itself")
    data = read_yaml_mapping(path, ProfileError, "settings")
    base = data.get("base")
    values: dict[str, Any] = {}
    if base:
        parent = load_profile(str(base), env, _seen + (path.resolve(),))
        values = {k: getattr(parent, k) for k in FIELDS}
    unknown = sorted(set(data) - set(FIELDS) - {"base"})
    if unknown:
        raise ProfileError(f"{path}: unknown key(s) {', '.join(unknown)}. Valid keys: {', '.join(FIELDS)}, base")
    for k, v in data.items():
        if k != "base":
            values[k] = _coerce(k, v, str(path))
    values["name"] = str(data.get("name") or path.stem)
    prof = Profile(**values, source=str(path))
    validate(prof)
    return prof


def validate(p: Profile) -> None:
    errors = []
    if p.gpus < 0 or p.nodes < 1 or p.cpus_per_task < 1:
        errors.append("gpus must be >= 0, nodes and cpus_per_task >= 1")
    if p.signal_before_s < 0:
        errors.append("signal_before_s must be >= 0")
    for k in p.env:
        if not k.isidentifier():
            errors.append(f"env: {k!r} is not a valid variable name")
    for opt in p.sbatch_extra:
        if not opt.startswith("-"):
            errors.append(f"sbatch_extra: {opt!r} should look like --key=value")
    if errors:
        raise ProfileError(f"{p.source or p.name}: " + "; ".join(errors))
