"""Evaluating a checkpoint: `python -m t2v.eval --ckpt PATH --manifest TEST_MANIFEST --num N --i3d I3D.pt`.

Samples N clips of the manifest and one caption of each (fixed by --seed), generates a video per caption
with the checkpoint's EMA weights (DDIM, or Euler for a flow model; classifier-free guidance, batched), and computes

  CLIPSIM  the mean over every generated frame of the cosine similarity between the CLIP image embedding of
           the frame and the CLIP text embedding of its caption, reported as a raw cosine in [-1, 1]
           (papers print e.g. 0.2631; some multiply by 100). The CLIP model (--clip, a Hugging Face name
           or a local folder, default openai/clip-vit-base-patch32) is separate from the checkpoint's own
           text encoder, which only embeds the captions for generation.
  FVD      the Fréchet distance between Gaussians fitted to I3D features of the N real clips (the same
           clips, decoded at the model's FRAMES x SIZE) and of the N generated ones. The I3D network is the
           TorchScript file StyleGAN-V's FVD uses (i3d_torchscript.pt, --i3d), called as
           ``detector(videos, rescale=False, resize=True, return_features=True)`` on float (B, 3, T, H, W)
           in [-1, 1] (it resizes frames to 224x224 itself) and giving (B, 400) features. Clips shorter
           than 16 frames are stretched to 16 by repeating frames (nearest-frame temporal resize: 8 frames
           -> each shown twice), real and generated alike, because I3D's temporal kernels and pooling need
           more frames than our 8.

Both sets go through the same path: generated videos are quantised to uint8 like the decoded real clips.
The result is written to RUN_DIR/eval/step_NNNNNN.json (RUN_DIR = the checkpoint's folder), which
tools/report.py plots against the step. Numbers depend on num, seed, batch size (the noise is drawn per
batch), steps, guidance and the device, all of which the file records. FVD is strongly biased by N (with
400-d features and N < 400 the covariances are singular, which the Fréchet distance handles, but the value
is not comparable with FVDs computed on thousands of clips).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from t2v import files, hf
from t2v import metrics
from t2v.device import DeviceError, pick_device
from t2v.hf import MIN_TOKENIZER_VOCAB, hf_tokenize
from t2v.progress import progress as progress_counter
from t2v.vae import VAEError

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_FRAMES = 16  # clips are stretched to at least this many frames before I3D
# OpenAI CLIP's image normalisation (CLIPImageProcessor's image_mean / image_std for every OpenAI checkpoint).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EvalError(RuntimeError):
    """Evaluation cannot run (weights missing, bad arguments); the message says what to do."""


# ------------------------------------------------------------------------------------------------ CLIP


def _how_to_get_clip(name: str) -> str:
    hub = name if not Path(name).expanduser().is_absolute() and name.count("/") <= 1 else DEFAULT_CLIP
    return (
        "How to get the CLIP model (text AND vision towers) onto a compute node without internet:\n"
        "  1. On a machine with internet (e.g. the login node), with HF_HOME pointing at a shared folder:\n"
        "       export HF_HOME=/scratch/$USER/hf\n"
        f"       python -c \"from transformers import CLIPModel, CLIPTokenizer; CLIPModel.from_pretrained('{hub}'); "
        f"CLIPTokenizer.from_pretrained('{hub}')\"\n"
        "  2. In the job: export HF_HOME=/scratch/$USER/hf HF_HUB_OFFLINE=1, and pass --clip " + hub + "\n"
        "  Or save both with save_pretrained() into one folder, copy it to the cluster and pass --clip /path/to/folder.\n"
        "  (Or skip the metric with --no-clipsim.)"
    )


def _pooled(out) -> torch.Tensor:
    # transformers 4.x returns the projected embeddings; 5.x an output object with them in pooler_output.
    return out if torch.is_tensor(out) else out.pooler_output


class ClipScorer:
    """A Hugging Face ``CLIPModel`` + a tokenize function, as the two encoders ``metrics.clipsim`` takes.

    ``tokenize(captions, max_tokens) -> (input_ids (B, L), attention_mask (B, L))``, padded on the right.
    Frames are preprocessed like CLIP's image processor on a square frame: quantised to uint8 levels,
    bicubic-resized (antialiased) so the short side is the model's image size, centre-cropped, normalised
    with OpenAI CLIP's mean/std. (Done on tensors; PIL's bicubic on uint8 differs in the last digits.)
    """

    def __init__(self, model, tokenize: Callable, name: str = "", device: str | torch.device = "cpu",
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, max_tokens: int = 77):
        self.model = model.eval().requires_grad_(False)
        self.tokenize = tokenize
        self.name = name or type(model).__name__
        self.image_size = int(model.config.vision_config.image_size)
        self.max_tokens = min(int(max_tokens), int(model.config.text_config.max_position_embeddings))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device) -> "ClipScorer":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [-1, 1] -> CLIP pixel_values (N, 3, S, S)."""
        x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            size = (max(s, round(h * scale)), max(s, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            top, left = (size[0] - s) // 2, (size[1] - s) // 2
            x = x[:, :, top:top + s, left:left + s]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def encode_images(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(frames.to(self.device))
        return _pooled(self.model.get_image_features(pixel_values=pixels)).float()

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenize(list(captions), self.max_tokens)
        out = self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return _pooled(out).float()


def load_clip(name: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> ClipScorer:
    """The full CLIP model (both towers) and its tokenizer from a hub name or a local folder.

    Loaded offline first by ``t2v.hf``: the local Hugging Face cache is tried first; a download is attempted only
    when not offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE unset) and ``name`` is not a folder. Raises EvalError
    with instructions when the weights are not there."""
    name = str(name)
    try:
        folder = hf.local_folder(name)
    except FileNotFoundError:
        raise EvalError(f"CLIP model folder {name!r} does not exist.\n" + _how_to_get_clip(name)) from None
    source = str(folder) if folder else name
    from transformers import AutoConfig, CLIPModel, CLIPTokenizer

    def load(local_only: bool):
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        if config.model_type != "clip":
            raise EvalError(
                f"{source!r} holds a {config.model_type!r} model, not a full CLIP model: CLIPSIM needs both the "
                "text and the vision tower (a folder saved from CLIPTextModel, as used for text.name, is not "
                "enough).\n" + _how_to_get_clip(name))
        model, info = CLIPModel.from_pretrained(source, local_files_only=local_only, output_loading_info=True)
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
        if missing:
            raise EvalError(f"{source!r}: {len(missing)} CLIP weights missing from the files (e.g. {sorted(missing)[0]}); "
                            "refusing to score with randomly initialised layers.\n" + _how_to_get_clip(name))
        return model, CLIPTokenizer.from_pretrained(source, local_files_only=local_only)

    model, tok = hf.load_offline_first(load, name, folder, "CLIP model", _how_to_get_clip(name), EvalError)
    vocab = int(model.config.text_config.vocab_size)
    # Offline, CLIPTokenizer.from_pretrained of a name that is not cached can return a placeholder tokenizer
    # with a couple of tokens instead of raising: refuse it (a real one fills the model's vocabulary).
    if len(tok) < min(MIN_TOKENIZER_VOCAB, vocab // 2):
        raise EvalError(f"the CLIP tokenizer loaded from {source!r} has only {len(tok)} tokens for a model with "
                        f"{vocab}: its files are missing.\n" + _how_to_get_clip(name))
    if len(tok) > vocab:
        raise EvalError(f"{source!r}: tokenizer has {len(tok)} tokens but the model only {vocab} embeddings")
    return ClipScorer(model, hf_tokenize(tok), name=source, device=device)


# ------------------------------------------------------------------------------------------------- I3D


def _how_to_get_i3d() -> str:
    return (
        "FVD needs the I3D feature extractor as a TorchScript file (i3d_torchscript.pt, the one StyleGAN-V's "
        "FVD uses). Compute nodes have no internet, so:\n"
        f"  1. On a machine with internet: wget -O i3d_torchscript.pt '{I3D_URL}'\n"
        "  2. Copy it to the cluster: scp i3d_torchscript.pt LOGIN_NODE:/scratch/$USER/models/\n"
        "  3. Pass --i3d /scratch/$USER/models/i3d_torchscript.pt (or skip the metric with --no-fvd)."
    )


def load_i3d(path: str | os.PathLike | None, device: str | torch.device = "cpu"):
    """The I3D TorchScript module in eval mode; EvalError with download instructions if it is missing."""
    if path is None or str(path) == "":
        raise EvalError("no I3D file given (--i3d PATH).\n" + _how_to_get_i3d())
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalError(f"I3D file not found: {p}\n" + _how_to_get_i3d())
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; this file only exists as one
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location=torch.device(device))
    except (RuntimeError, ValueError, OSError) as e:
        raise EvalError(f"{p} is not a loadable TorchScript file ({str(e).strip().splitlines()[0][:200]}).\n"
                        + _how_to_get_i3d()) from None
    return module.eval()


def stretch_frames(videos: torch.Tensor, min_frames: int = I3D_FRAMES) -> torch.Tensor:
    """(B, T, ...) -> (B, max(T, min_frames), ...) by nearest-frame temporal resizing (repeats frames)."""
    t = videos.shape[1]
    if t >= min_frames:
        return videos
    idx = (torch.arange(min_frames) * t) // min_frames
    return videos[:, idx]


@torch.no_grad()
def i3d_features(detector, videos: torch.Tensor, device: str | torch.device = "cpu") -> np.ndarray:
    """I3D features (B, D) float64 of videos (B, T, 3, H, W) float in [-1, 1]."""
    x = stretch_frames(videos.float()).permute(0, 2, 1, 3, 4).contiguous().to(device)  # b t c h w -> b c t h w
    feats = detector(x, rescale=False, resize=True, return_features=True)
    if not torch.is_tensor(feats) or feats.ndim != 2 or feats.shape[0] != videos.shape[0]:
        shape = tuple(feats.shape) if torch.is_tensor(feats) else type(feats).__name__
        raise EvalError(f"the I3D detector returned {shape} for {videos.shape[0]} videos; expected (B, 400) "
                        "features. Is --i3d the StyleGAN-V i3d_torchscript.pt?")
    return feats.detach().double().cpu().numpy()


# ------------------------------------------------------------------------------------------ evaluation


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        d = pick_device(device)
    except DeviceError as e:
        raise EvalError(f"--device: {e}") from None
    return d


def eval_path(ckpt_file: str | os.PathLike, step: int) -> Path:
    """RUN_DIR/eval/step_NNNNNN.json, RUN_DIR being the checkpoint's folder."""
    return Path(ckpt_file).resolve().parent / "eval" / f"step_{int(step):06d}.json"


def sample_eval_set(clips: Sequence, num: int, seed: int) -> tuple[list, list[str]]:
    """``num`` distinct clips and one caption of each, fixed by ``seed``."""
    from t2v.data.manifest import pick_caption

    if num < 1:
        raise EvalError(f"--num must be >= 1, got {num}")
    if num > len(clips):
        raise EvalError(f"--num {num} but the manifest has only {len(clips)} clips")
    order = np.random.default_rng(seed).permutation(len(clips))[:num]
    chosen = [clips[int(i)] for i in order]
    return chosen, [pick_caption(c.captions, seed, int(i)) for c, i in zip(chosen, order)]


def _to_uint8(videos: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) float in [-1, 1] -> uint8, as a saved video would be."""
    return ((videos.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _to_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float().div(127.5).sub(1.0)


def _batch_seed(seed: int, start: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(start)]).generate_state(1)[0])


def _bar(total: int, desc: str, progress: bool):
    return progress_counter(total=total, desc=desc, unit="video", enabled=progress)


def write_json(path: Path, record: dict) -> Path:
    """JSON written atomically (t2v.files): never a torn file."""
    return files.write_json(path, record)


def evaluate(
    ckpt_path: str | os.PathLike,
    manifest: str | os.PathLike,
    num: int,
    *,
    clip_model: Any = None,
    i3d: Any = None,
    clipsim: bool = True,
    fvd: bool = True,
    steps: int = 50,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    video_root: str | os.PathLike = "",
    write: bool = True,
    progress: bool = False,
) -> dict:
    """Generate ``num`` videos for captions of ``manifest`` with the EMA weights of ``ckpt_path`` (a file or a
    run folder: its newest valid checkpoint) and score them. Returns the record written (unless
    ``write=False``) to RUN_DIR/eval/step_NNNNNN.json; ``record["path"]`` is not in the file.

    clip_model: None (load ``DEFAULT_CLIP``), a hub name / local folder for ``load_clip``, or an object with
      ``encode_images(frames (N, 3, H, W) in [-1, 1]) -> (N, D)`` and ``encode_text(captions) -> (N, D)``
      (and optionally ``name``).
    i3d: a path for ``load_i3d``, or a callable with the I3D TorchScript's signature; required for FVD.
    Everything that can fail (weights, manifest, videos, caption embeddings) is checked before generating.
    """
    from t2v.data.manifest import read_manifest
    from t2v.data.video import decode_uint8, frame_hw
    from t2v.data.windows import fixed_window
    from t2v.sample import embed_prompts, generate, load_ema_and_rate, resolve_checkpoint, space_for_sampling

    t0 = time.time()
    if not (clipsim or fvd):
        raise EvalError("nothing to compute: both CLIPSIM and FVD are disabled")
    if batch_size < 1 or steps < 1:
        raise EvalError(f"--batch-size and --steps must be >= 1 (got {batch_size}, {steps})")
    if fvd and num < 2:
        raise EvalError(f"FVD needs --num >= 2 (a covariance), got {num}")
    device = resolve_device(device)

    # 1. Models and data, cheapest checks first, so a missing file fails in seconds, not after generation.
    clip_name = i3d_name = None
    scorer = detector = None
    if fvd:
        if i3d is None or isinstance(i3d, (str, os.PathLike)):
            detector = load_i3d(i3d, device)
            i3d_name = str(Path(i3d).expanduser().resolve())
        else:
            detector = i3d
            i3d_name = str(getattr(i3d, "name", None) or type(i3d).__name__)
    if clipsim:
        if clip_model is None or isinstance(clip_model, (str, os.PathLike)):
            scorer = load_clip(str(clip_model or DEFAULT_CLIP), device)
        else:
            scorer = clip_model
            if hasattr(scorer, "to"):
                scorer.to(device)
        clip_name = str(getattr(scorer, "name", type(scorer).__name__))
    ckpt_file = resolve_checkpoint(ckpt_path).resolve()
    cfg, model, step, fps = load_ema_and_rate(ckpt_file, device)
    space = space_for_sampling(cfg, device)  # samples are frames (a latent model's are decoded) before scoring
    frames, size = cfg.data.frames, cfg.data.frame_size
    guidance = float(cfg.train.guidance if guidance is None else guidance)
    clips = read_manifest(manifest, video_root=video_root)
    chosen, captions = sample_eval_set(clips, num, seed)
    text, tokens, token_mask = embed_prompts(cfg, captions)  # the checkpoint's own text encoder (may be the hash demo encoder)

    # 2. Real clips (for FVD), decoded like training data at the model's FRAMES x SIZE; features right away.
    real_feats = None
    if fvd:
        real = torch.empty(num, frames, 3, *frame_hw(size), dtype=torch.uint8)
        with _bar(num, "real clips", progress) as bar:
            for i, clip in enumerate(chosen):
                u8 = (fixed_window(clip, cfg.data, seed, i)[0] if cfg.data.sampling == "window" else  # as trained
                      decode_uint8(clip.video, frames, size, sampling="even", start=clip.start, end=clip.end))
                real[i] = torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2)  # t h w c -> t c h w
                bar.update(1)
        parts = []
        with _bar(num, "I3D real", progress) as bar:
            for s in range(0, num, batch_size):
                parts.append(i3d_features(detector, _to_float(real[s:s + batch_size]), device))
                bar.update(min(batch_size, num - s))
        real_feats = np.concatenate(parts)
        del real

    # 3. Generate (fixed noise per batch: seed and batch start), kept as uint8 like a saved video.
    fake = torch.empty(num, frames, 3, *frame_hw(size), dtype=torch.uint8)
    sampler = "Euler" if cfg.diffusion.objective == "flow" else "DDIM"  # generate()'s default for the objective
    with _bar(num, f"generating ({steps} {sampler} steps)", progress) as bar:
        for s in range(0, num, batch_size):
            tok = (tokens[s:s + batch_size], token_mask[s:s + batch_size]) if tokens is not None else (None, None)
            videos = generate(model, cfg, text[s:s + batch_size], tokens=tok[0], token_mask=tok[1], steps=steps, fps=fps,
                              guidance=guidance, seed=_batch_seed(seed, s), device=device, space=space)
            fake[s:s + videos.shape[0]] = _to_uint8(videos)
            bar.update(videos.shape[0])
    del model

    # 4. Metrics.
    clip_value = fvd_value = None
    if clipsim:
        scores = []
        with _bar(num, "CLIPSIM", progress) as bar:
            for s in range(0, num, batch_size):
                scores.append(metrics.clip_scores(scorer.encode_images, scorer.encode_text,
                                                  _to_float(fake[s:s + batch_size]), captions[s:s + batch_size]))
                bar.update(min(batch_size, num - s))
        clip_value = float(torch.cat(scores).double().mean())  # every video has T frames: = mean over frames
    if fvd:
        parts = []
        with _bar(num, "I3D generated", progress) as bar:
            for s in range(0, num, batch_size):
                parts.append(i3d_features(detector, _to_float(fake[s:s + batch_size]), device))
                bar.update(min(batch_size, num - s))
        fvd_value = metrics.fvd_from_features(real_feats, np.concatenate(parts))

    record = {
        "step": step, "ckpt": str(ckpt_file), "num": num, "seed": seed, "ddim_steps": steps, "sampler": sampler,
        "guidance": guidance, "clipsim": clip_value, "fvd": fvd_value, "clip_model": clip_name,
        "i3d": i3d_name, "frames": frames, "size": size, "time": round(time.time() - t0, 3),
        "manifest": str(Path(manifest).resolve()), "batch_size": batch_size, "device": str(device),
    }
    out = eval_path(ckpt_file, step)
    if write:
        write_json(out, record)
    return {**record, "path": str(out)}


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    from t2v.checkpoint import CheckpointError
    from t2v.config import ConfigError
    from t2v.data.manifest import ManifestError
    from t2v.data.video import VideoError
    from t2v.text import EmbeddingCacheError, TextEncoderError

    p = argparse.ArgumentParser(prog="python -m t2v.eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file or run folder (its newest valid checkpoint)")
    p.add_argument("--manifest", required=True, help="test manifest (JSON lines); real clips and captions")
    p.add_argument("--num", type=int, default=256, help="captions/videos to evaluate (default 256)")
    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP model for CLIPSIM: hub name or local folder "
                                                        f"(default {DEFAULT_CLIP})")
    p.add_argument("--i3d", default=None, help="I3D TorchScript file for FVD (i3d_torchscript.pt)")
    p.add_argument("--no-fvd", action="store_true", help="skip FVD")
    p.add_argument("--no-clipsim", action="store_true", help="skip CLIPSIM")
    p.add_argument("--steps", type=int, default=50, help="DDIM (Euler for a flow model) steps (default 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="fixes the captions and the noise (default 0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--video-root", default="", help="folder relative paths resolve against (default: the manifest's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        r = evaluate(args.ckpt, args.manifest, args.num, clip_model=args.clip, i3d=args.i3d,
                     clipsim=not args.no_clipsim, fvd=not args.no_fvd, steps=args.steps, guidance=args.guidance,
                     seed=args.seed, batch_size=args.batch_size, device=args.device, video_root=args.video_root,
                     progress=not args.no_progress)
    except (EvalError, CheckpointError, ConfigError, ManifestError, VideoError, TextEncoderError,
            EmbeddingCacheError, VAEError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shown = [f"CLIPSIM {r['clipsim']:.4f}" if r["clipsim"] is not None else "",
             f"FVD {r['fvd']:.2f}" if r["fvd"] is not None else ""]
    print(f"step {r['step']} | {r['num']} videos | {r['ddim_steps']} {r['sampler']} steps | guidance "
          f"{r['guidance']:g} | " + " | ".join(s for s in shown if s) + f" | {r['time']:.0f} s")
    print(f"wrote {r['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
