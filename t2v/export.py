"""Export a fine-tuned pretrained model as diffusers users load it:
`python -m t2v.export RUN_OR_CKPT [--format lora|motion|full] [--out DIR]`; or convert a checkpoint between its two
kinds: `--format file` (a sharded folder, train.parallel=fsdp, as one ckpt_NNNNNN.pt) and `--format sharded` (a file
as a folder that any number of ranks loads). Both conversions keep every tensor exactly; either kind resumes either
kind of run.

Each family writes its own formats (``export`` and ``EXPORTS`` in t2v/models/wan.py and animatediff.py):

  lora    ``pytorch_lora_weights.safetensors`` for the pipeline's ``load_lora_weights(DIR)``, with the adapter's
          rank, alpha and targets in the file's metadata, so diffusers scales it as it was trained
  motion  (AnimateDiff) the motion modules as a ``MotionAdapter`` folder
  full    the fine-tuned network (a LoRA merged into it) with save_pretrained; for Wan a whole pipeline folder

The EMA weights are exported, as `python -m t2v.sample` samples them; the default folder is RUN/export/ckpt_NNNNNN/
(never one that is not empty), and its t2v_export.json says where it came from and how to load it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from t2v import checkpoint as ckpt
from t2v.runlog import TrainingError
from t2v.sample import load_ema, resolve_checkpoint

FORMATS = ("lora", "motion", "full")
CONVERSIONS = ("file", "sharded")  # t2v.sharded


class ExportError(RuntimeError):
    pass


def export(path: str | Path, fmt: str = "", out: str | Path | None = None) -> Path:
    """Export the checkpoint (or a run folder's newest) ``path`` in its family's format ``fmt`` ("" = what trained:
    lora, motion or full); returns what was written."""
    src = resolve_checkpoint(path)
    if fmt in CONVERSIONS:
        return convert(src, fmt, out)
    cfg, model, step = load_ema(src, base_dtype="fp32")  # a LoRA merged into the fp32 base, as it was published
    family = {"wan": "t2v.models.wan", "animatediff": "t2v.models.animatediff"}.get(cfg.model.arch)
    if family is None or not getattr(model, "base", None):
        raise ExportError(f"{src}: model.arch={cfg.model.arch} was trained from scratch; export writes a "
                          "pretrained family's fine-tune (model.arch=wan or animatediff)")
    module = importlib.import_module(family)
    fmt = fmt or cfg.train.finetune
    if fmt not in module.EXPORTS:
        raise ExportError(f"--format {fmt}: model.arch={cfg.model.arch} exports {', '.join(module.EXPORTS)}")
    if fmt in ("lora", "motion") and cfg.train.finetune != fmt:
        raise ExportError(f"{src}: --format {fmt} needs a train.finetune={fmt} run (this one is "
                          f"{cfg.train.finetune}); use --format full")
    dest = Path(out) if out else src.parent / "export" / src.stem
    if dest.exists() and any(dest.iterdir()):
        raise ExportError(f"{dest} exists and is not empty: nothing already saved is overwritten; give --out")
    dest.mkdir(parents=True, exist_ok=True)
    written, load = module.export(model, fmt, dest)
    (dest / "t2v_export.json").write_text(json.dumps({"checkpoint": str(src), "step": step, "format": fmt,
                                                      "base": model.base, "load": load}, indent=2) + "\n")
    return written


def convert(src: Path, kind: str, out: str | Path | None = None) -> Path:
    """The checkpoint ``src`` as a single file (``kind="file"``) or a sharded folder ("sharded"), every tensor as
    saved; default RUN/export/ckpt_NNNNNN.pt or RUN/export/ckpt_NNNNNN/ (move it into a run folder to resume)."""
    from t2v import config
    from t2v import sharded
    from t2v.models import build_model

    if kind == "file" and not src.is_dir() or kind == "sharded" and src.is_dir():
        raise ExportError(f"{src} is already a {'sharded folder' if src.is_dir() else 'single file'}")
    dest = Path(out) if out else src.parent / "export" / (f"{src.name}.pt" if kind == "file" else src.stem)
    if dest.exists():
        raise ExportError(f"{dest} exists: nothing already saved is overwritten; give --out")
    dest.parent.mkdir(parents=True, exist_ok=True)
    state = ckpt.load_checkpoint(src)
    if kind == "file":  # the optimizer keyed by parameter name -> numbered as Optimizer.state_dict() numbers it
        return ckpt.save_checkpoint({**state, "optimizer": sharded.optimizer_by_index(state["optimizer"])}, dest)
    # the names of what trains, in the optimizer's order, are the model's: build it (a pretrained one's base too)
    cfg = config.from_dict(state["config"])
    model = build_model(cfg, state["data"].get("channels", 3))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return sharded.save_full({**state, "optimizer": sharded.optimizer_by_name(state["optimizer"], names)}, dest)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2v.export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="checkpoint file or run folder (its newest valid checkpoint)")
    p.add_argument("--format", choices=FORMATS + CONVERSIONS, default="",
                   help="lora, motion (AnimateDiff: a MotionAdapter) or full; default: what the run trained. Or "
                        "file / sharded: the checkpoint converted to the other kind")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export/ckpt_NNNNNN)")
    args = p.parse_args(argv)
    try:
        written = export(args.ckpt, args.format, args.out)
    except (ExportError, ckpt.CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {written}")
    if args.format in CONVERSIONS:
        return 0
    record = (written if written.is_dir() else written.parent) / "t2v_export.json"
    print(f"load it: {json.loads(record.read_text())['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
