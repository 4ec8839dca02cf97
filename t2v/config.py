"""Configuration: one small dataclass per concern, resolved in a fixed order.

Precedence (later wins):
  1. dataclass defaults (the baseline's defaults)
  2. a YAML file (``--config configs/demo.yaml`` or the CONFIG environment variable)
  3. the baseline's environment variables: MANIFEST, OUTDIR, STEPS, BS, FRAMES, SIZE, LR
  4. ``key=value`` arguments on the command line (``train.steps=5000``)

Unknown keys fail loudly and list the valid ones, because a typo in a 5000-step job should cost
seconds, not a night on the queue.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from t2v import config_checks
from t2v.files import write_text


@dataclass
class DataConfig:
    manifest: str = "/scratch/data/manifests/train.manifest.processed.jsonl"
    video_root: str = ""  # relative video paths resolve here; "" = the manifest's folder
    frames: int = 8
    size: int = 64  # frame height, and width unless data.width is set
    width: int = 0  # frame width; 0 = data.size (square). MSR-VTT's own frames: data.size=240 data.width=320
    # "even": FRAMES spread over the whole clip (the baseline); "window": FRAMES consecutive frames at data.fps inside
    # one shot, a fresh window every draw, from the window cache (t2v.data.windows); "random_window": FRAMES spread
    # over a random data.window fraction of the clip, decoded per sample (no cache)
    sampling: str = "even"
    window: float = 0.5  # random_window: fraction of the clip covered by a window
    fps: float = 0.0  # window: frames per second the model sees (0: data.frame_interval instead)
    frame_interval: int = 0  # window: every k-th source frame instead of a rate in seconds
    strides: tuple = (1,)  # window: each draw takes every s-th cached frame, s one of these (several rates)
    max_seconds: float = 30.0  # window: the cache keeps at most this much of each clip, from its start
    cuts: bool = True  # window: find scene cuts when caching (PySceneDetect); a window never spans one
    cut_threshold: float = 27.0  # window: the content detector's threshold (its default); higher = fewer cuts
    short_clips: str = "skip"  # window: a clip with no shot as long as a window is "skip"ped or "pad"ded
    # window with a video VAE (Wan's): its latents belong to a whole window, so the latent window cache encodes this
    # many windows of data.frames per clip, spread over its shots, and each draw takes one of them
    latent_windows: int = 4
    cache: bool = True  # pre-decode clips into a memory-mapped uint8 cache (built once)
    cache_dir: str = ""  # "" = <manifest folder>/.t2v_cache
    skip_bad_lines: bool = False  # train on a manifest with bad lines, skipping them
    max_bad_clips: int = 50  # corrupt clips skipped at train time before training stops
    num_workers: int = 2
    val_manifest: str = ""  # clips for the validation loss; "" = val.jsonl beside the manifest (skipped if absent)

    @property
    def frame_size(self) -> int | tuple[int, int]:  # t2v.data.video.frame_hw: a square's side keeps its caches' names
        return self.size if self.width in (0, self.size) else (self.size, self.width)


@dataclass
class TextConfig:
    # "clip" (Hugging Face CLIP text model), "hash" (offline demo encoder), "tiny" (tests), "umt5" (Wan's, with
    # text.name its pipeline: per-token, text.tokens=true, text.dim=4096, text.max_tokens=512), "sd_clip" (Stable
    # Diffusion's CLIP ViT-L from text.name's text_encoder/: all 77 tokens, no mask, for model.arch=animatediff)
    encoder: str = "clip"
    name: str = "openai/clip-vit-base-patch32"  # hub name or local folder for encoder=clip, umt5 or sd_clip
    dim: int = 512
    max_tokens: int = 77
    tokens: bool = False  # also cache per-token embeddings (needed by model.cross_attention)
    cache_dir: str = ""  # "" = <manifest folder>/.t2v_cache


@dataclass
class VAEConfig:
    """The frozen pretrained VAE of latent-space training (model.space=latent): diffusers' AutoencoderKL."""

    name: str = "stabilityai/sd-vae-ft-mse"  # hub name (fetched once on a login node) or a save_pretrained folder
    subfolder: str = ""  # e.g. "vae" for a whole Stable Diffusion repository
    batch_size: int = 16  # frames per encode/decode call: bounds the VAE's memory


@dataclass
class ModelConfig:
    size: str = "base"  # a name in t2v.models.unet.SIZES: tiny, small, base, large
    space: str = "pixel"  # "pixel": the UNet denoises RGB frames; "latent": the VAE's latents (vae section)
    in_channels: int = 0  # 0: 3 in pixel space, the VAE's latent channels in latent space (t2v.space)
    base_channels: int = 0  # 0 = taken from the size registry
    channel_mults: tuple = ()  # () = taken from the size registry
    temporal_attention: bool = False
    cross_attention: bool = False
    dropout: float = 0.0
    coords: bool = False  # feed (frame, row, column) coordinate channels to the network
    frame_cond: bool = False  # one FiLM conditioning per frame: an MLP of (caption + timestep, frame index)
    checkpointing: bool = False  # activation checkpointing of the UNet blocks: less memory, ~1 more forward
    fps_cond: bool = False  # condition on the clip's frame rate (data.sampling=window), as ModelScope/VideoCrafter
    # "unet": the 3D UNet above; "dit": a video transformer (t2v.models.dit: Latte's alternating spatial/temporal
    # blocks); "wan": Wan 2.1's pretrained transformer from model.pretrained (t2v.models.wan), fine-tuned
    # (train.finetune); "animatediff": a Stable Diffusion 1.5 UNet from model.pretrained inflated with a motion
    # adapter (t2v.models.animatediff)
    arch: str = "unet"
    pretrained: str = ""  # wan, animatediff: a hub name (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or a local diffusers folder
    motion_adapter: str = ""  # animatediff: a MotionAdapter's hub name or folder; "" = a fresh one, zero-initialised
    base_dtype: str = "fp32"  # wan, animatediff: "bf16" keeps the frozen base in bf16 (half its memory; lora, motion)
    # dit: patch size in pixels (or latent cells); 0 = 2, or 1 where a frame is 16 or smaller. unet: p x p pixels
    # become one position with p²·c channels before the first level (space-to-depth); 0 = 1, none
    patch: int = 0
    # unet: every downsampling halves the frame count as well as the frame size (a 3x3x3 stride-2 conv, nearest
    # x2 in time on the way up): the lower levels cost half; data.frames must divide (a multiple of 4)
    downsample_time: bool = False
    hidden: int = 0  # dit: token width; 0 = from model.size (t2v.models.dit.SIZES)
    depth: int = 0  # dit: number of blocks (each one spatial or one temporal); 0 = from model.size
    heads: int = 0  # dit: attention heads; 0 = from model.size


@dataclass
class DiffusionConfig:
    # "ddpm": Gaussian diffusion on the schedule below (the baseline); "flow": rectified flow, x_t = (1 - t) x0 + t eps
    # and the model predicts eps - x0 (t2v.flow; SD3, Open-Sora, Wan)
    objective: str = "ddpm"
    timesteps: int = 1000  # ddpm: the chain's length; flow: t = timestep / this (val_timesteps, the model's input)
    schedule: str = "cosine"  # ddpm only
    # ddpm, schedule=linear: the betas' ends; 0 = Ho et al.'s 1e-4 and 0.02 (AnimateDiff: 0.00085 and 0.012)
    beta_start: float = 0.0
    beta_end: float = 0.0
    # every SNR divided by shift² (1 = none): ddpm, a shifted schedule; flow, SD3's t -> shift t / (1 + (shift-1) t)
    shift: float = 1.0
    prediction: str = "eps"  # ddpm only: "eps" (the baseline) or "v"
    logit_mean: float = 0.0  # flow: training t ~ sigmoid(N(logit_mean, logit_std²)), then shifted (SD3's logit-normal)
    logit_std: float = 1.0
    cond_dropout: float = 0.1  # caption dropout for classifier-free guidance
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off (plain MSE)


@dataclass
class TrainConfig:
    outdir: str = "/scratch/runs/t2v_ddpm"
    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 1  # micro-batches per optimizer step: global batch = batch_size x ranks x grad_accum
    lr: float = 1e-4
    warmup: int = 100
    lr_cooldown: float = 0.0  # the last this fraction of train.steps lowers lr linearly to 0 (WSD); 0 = constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"  # auto: bf16 on GPUs that support it, else fp16; fp32 on CPU. Or bf16/fp16/fp32
    seed: int = 0
    device: str = "auto"
    log_every: int = 20
    ckpt_every: int = 200
    keep_last: int = 3
    sample_every: int = 200  # 0 = no preview grids
    val_every: int = 1000  # validation loss at fixed timesteps every this many steps; 0 = off
    val_clips: int = 32  # the first this many clips of data.val_manifest
    val_timesteps: tuple = (100, 300, 500, 700, 900)
    sample_steps: int = 50  # DDIM steps for previews
    # previews' and t2v.sample's default sampler: "" = the objective's first (ddim, euler); unipc = Wan's own
    sample_method: str = ""
    guidance: float = 3.0
    sample_prompts: tuple = (
        "a red circle moving right",
        "a green square moving up",
        "a blue triangle moving left",
        "a yellow circle moving down",
    )
    max_nan_steps: int = 20
    max_restarts: int = 20  # the job script stops requeueing after this many restarts
    # How long a rank waits in a collective (gloo and NCCL) before it gives up on the others: longer than the
    # cluster's SlurmdTimeout, so that Slurm declares a lost node first and requeues (docs/multinode.md).
    dist_timeout_s: float = 600.0
    tensorboard: bool = True  # rank 0 writes OUTDIR/tensorboard: `tensorboard --logdir runs/` (docs/reports.md)
    # off, offline (OUTDIR/wandb, uploaded by `wandb sync` from a login node) or online; needs the wandb extra
    wandb: str = "off"
    wandb_project: str = "t2v-slurm"
    compile: bool = False
    channels_last: bool = False
    # ddp: every rank holds the whole model and its Adam state; fsdp: each holds 1/N of them (FSDP2), and a
    # checkpoint is a folder every rank writes its shard into (docs/multinode.md, docs/checkpoints.md)
    parallel: str = "ddp"
    # deterministic kernels only (torch.use_deterministic_algorithms, cuBLAS workspace, no cuDNN autotuning): a GPU
    # resume can then be compared bit for bit, at some cost in speed
    deterministic: bool = False
    # the card's peak TFLOP/s for MFU in metrics.jsonl; 0 = from t2v.flops' table of A100/H100/H200 peaks
    peak_tflops: float = 0.0
    # a pretrained model (model.pretrained): "full" trains every weight, "lora" a low-rank adapter (peft) on
    # train.lora_targets; a checkpoint holds only what trains
    finetune: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 0.0  # 0 = lora_rank (scale 1)
    lora_targets: tuple = ()  # module-name suffixes or one regular expression; () = to_q,to_k,to_v,to_out.0
    allow_changes: tuple = ()  # keys a resume may change although the checkpoint's weights were trained for them


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)


# The baseline's environment variables, which people's scripts already set.
ENV_VARS = {
    "MANIFEST": "data.manifest",
    "OUTDIR": "train.outdir",
    "STEPS": "train.steps",
    "BS": "train.batch_size",
    "FRAMES": "data.frames",
    "SIZE": "data.size",
    "LR": "train.lr",
}


class ConfigError(ValueError):
    pass


def valid_keys(cfg: Config | None = None) -> list[str]:
    cfg = cfg or Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def _convert(value: Any, typ: Any, key: str, where: str) -> Any:
    """Coerce a YAML/env/CLI value to the field's type; strings come from env vars and key=value."""
    try:
        if typ is bool or typ == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if typ is int or typ == "int":
            if isinstance(value, bool):
                raise ValueError("boolean given")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"not an integer: {value!r}")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float or typ == "float":
            return float(value)
        if typ is tuple or typ == "tuple":
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]  # data.strides=2 means (2,)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"not a list: {value!r}")
            return tuple(value)
        if isinstance(value, bool):  # YAML reads a bare off/on as a boolean: `wandb: off` means the word
            return "on" if value else "off"
        return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad value for {key}: {e}") from None


def set_key(cfg: Config, key: str, value: Any, where: str) -> None:
    """Set one dotted key from a file, the environment or an argument; None (``key=null``, a YAML ``key:`` with no
    value) puts it back to its default, so a key a config file sets can be undone on the command line."""
    section, _, name = key.partition(".")
    sub = getattr(cfg, section, None) if section in {f.name for f in dataclasses.fields(cfg)} else None
    names = {f.name: f for f in dataclasses.fields(sub)} if sub is not None else {}
    if not name or name not in names:
        raise ConfigError(f"{where}: unknown config key {key!r}. Valid keys:\n  " + "\n  ".join(valid_keys(cfg)))
    if value is None:
        setattr(sub, name, default_of(key))
        return
    hints = typing.get_type_hints(type(sub))
    setattr(sub, name, _convert(value, hints[name], key, where))


def default_of(key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(Config(), section), name)


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys: {'train': {'lr': 1}} -> {'train.lr': 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_yaml_mapping(path: Path, error: type[Exception], what: str) -> Mapping:
    """A YAML file that must hold a mapping; `error` names the file (and YAML's line) when it does not."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise error(f"{path}: expected a mapping of {what}")
    return data


def _yaml_lines(path: Path) -> dict[str, int]:
    """Line number of each flattened key in a YAML file, so errors can point at the line."""
    lines: dict[str, int] = {}
    node = yaml.compose(path.read_text())

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return lines


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    cfg = Config()
    env = os.environ if env is None else env
    path = path or env.get("CONFIG") or None
    origin: dict[str, str] = {}  # key -> where its value came from, for refusals that follow from the file
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = read_yaml_mapping(p, ConfigError, "sections (data:, train:, ...)")
        lines = _yaml_lines(p)
        for key, value in flatten(data).items():
            origin[key] = f"{p}:{lines.get(key, 1)}"
            set_key(cfg, key, value, origin[key])
    for var, key in ENV_VARS.items():
        if env.get(var, "") != "":
            origin[key] = f"the environment variable {var}"
            set_key(cfg, key, env[var], origin[key])
    for i, arg in enumerate(overrides):
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"argument {i + 1} ({arg!r}): expected key=value, e.g. train.steps=5000")
        origin[key.strip()] = f"argument {arg!r}"
        # key=null puts the default back; so does key= (an empty string would rarely be a useful value)
        set_key(cfg, key.strip(), yaml.safe_load(value) if value.strip() else None, origin[key.strip()])
    validate(cfg, origin)
    return cfg


def validate(cfg: Config, origin: Mapping[str, str] | None = None) -> None:
    """Every setting's range (t2v.config_checks), checked where the config is resolved: a bad value fails before
    any data is read, with every problem listed at once; ``origin`` (key -> file:line or argument) lets a
    problem say which key of the file to put back."""
    errors = config_checks.problems(cfg, valid_keys(cfg))
    if errors:
        errors = [config_checks.with_undo(e, cfg, origin or {}, default_of) for e in errors]
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    # tuples become lists so the dict is plain YAML/JSON and loads under torch.load(weights_only=True)
    return json.loads(json.dumps(d))


def from_dict(d: Mapping) -> Config:
    cfg = Config()
    for key, value in flatten(d).items():
        set_key(cfg, key, value, "checkpoint config")
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    write_text(path, to_yaml(cfg))


def uses_tokens(cfg: Config) -> bool:
    """Whether the model reads per-token caption embeddings (cross-attention, or a pretrained family whose text
    input is tokens), not only the pooled one."""
    return bool(cfg.model.cross_attention or cfg.model.pretrained)


def cache_dir(cfg: Config, kind: str = "data") -> Path:
    """Where caches live: the configured folder, else beside the manifest (shared by every run on it)."""
    explicit = cfg.data.cache_dir if kind == "data" else cfg.text.cache_dir
    return Path(explicit) if explicit else Path(cfg.data.manifest).resolve().parent / ".t2v_cache"


def val_manifest(cfg: Config) -> Path:
    """data.val_manifest, else val.jsonl beside the training manifest (the validation loss skips it if absent)."""
    return Path(cfg.data.val_manifest) if cfg.data.val_manifest else Path(cfg.data.manifest).parent / "val.jsonl"


def add_config_args(parser, manifest: bool = False) -> None:
    """--config F and key=value overrides; with ``manifest``, a MANIFEST path too, in any order among them: the
    positionals then land in ``positionals``, for split_positionals (argparse cannot tell a path from key=value)."""
    parser.add_argument("--config", default=None, help="YAML config file (default: $CONFIG)")
    if manifest:
        parser.add_argument("positionals", nargs="*", metavar="MANIFEST|key=value",
                            help="the manifest (stands for data.manifest=MANIFEST) and config overrides such as "
                                 "data.fps=8, in any order")
        return
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=5000")


def load_with_manifest(path, overrides: Sequence[str], manifest: str) -> Config:
    """load_config, with a positional MANIFEST (split_positionals) as data.manifest: set as given, not read as
    YAML (which would turn a file named ~ or 0x10 into something else), and after the file and $MANIFEST, as the
    most explicit setting."""
    cfg = load_config(path, overrides)
    if manifest:
        cfg.data.manifest = manifest
    return cfg


def split_positionals(values: Sequence[str]) -> tuple[str, list[str]]:
    """A command's positional arguments as (MANIFEST or "", key=value overrides), whatever their order.

    argparse hands over every positional in one list (so that `MANIFEST --config F data.fps=8` and
    `data.fps=8 MANIFEST` mean the same) and cannot tell a path from an override itself: an argument is an
    override when the part before its first = looks like a config key and it is not an existing file; anything
    else is the manifest. Refused here, before anything is decoded or encoded: two manifests, a manifest that does
    not exist (often an override that lost its =), and a manifest that contradicts an explicit data.manifest=.
    """
    hint = "config overrides are written key=value, e.g. data.fps=8"
    manifests, overrides = [], []
    for value in values:
        key, eq, _ = value.partition("=")
        looks_like_key = key and all(c.isascii() and (c.isalnum() or c in "_.") for c in key)  # data.fps, train.lr
        is_override = eq and looks_like_key and not Path(value).is_file()
        (overrides if is_override else manifests).append(value)
    if len(manifests) > 1:
        raise ConfigError(f"two manifests given: {' and '.join(manifests)}; give one ({hint})")
    manifest = manifests[0] if manifests else ""
    if manifest and not Path(manifest).is_file():
        raise ConfigError(f"manifest not found: {manifest} ({hint})")
    for arg in overrides:
        key, _, path = arg.partition("=")
        if manifest and key == "data.manifest" and Path(path.strip()).resolve() != Path(manifest).resolve():
            raise ConfigError(f"two manifests given: {manifest} and {arg}; give one")
    return manifest, overrides
