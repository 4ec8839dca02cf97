"""Export a fine-tuned pretrained model as diffusers users load it:
`python -m t2v.export RUN_OR_CKPT [--format lora|full] [--out DIR]`.

  lora  (a train.finetune=lora run; its default) ``pytorch_lora_weights.safetensors``, which
        ``WanPipeline.load_lora_weights(DIR)`` reads; the adapter's rank, alpha and targets are in the file's
        metadata, so diffusers scales it as it was trained (without them it assumes alpha = rank)
  full  a whole pipeline folder for ``WanPipeline.from_pretrained(DIR)``: the fine-tuned transformer (a LoRA merged
        into its weights) written with save_pretrained, every other component (VAE, text encoder, tokenizer,
        scheduler) a symbolic link to the base's folder, which must stay where it is

The EMA weights are exported, as `python -m t2v.sample` samples them. The default folder is RUN/export/ckpt_NNNNNN/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from t2v import checkpoint as ckpt
from t2v.runlog import TrainingError
from t2v.sample import load_ema, resolve_checkpoint

FORMATS = ("lora", "full")
LORA_FILE = "pytorch_lora_weights.safetensors"


class ExportError(RuntimeError):
    pass


def export_lora(model, out: Path) -> Path:
    """The LoRA of ``model`` (a WanDenoiser with an adapter) -> out/pytorch_lora_weights.safetensors."""
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    transformer = model.transformer
    layers = get_peft_model_state_dict(transformer)
    metadata = transformer.peft_config["default"].to_dict()
    WanPipeline.save_lora_weights(out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
    return out / LORA_FILE


def export_full(model, base_folder: Path, out: Path) -> Path:
    """``model``'s transformer (LoRA merged) -> out/transformer; the base pipeline's other parts linked beside it."""
    transformer = model.transformer
    if getattr(transformer, "peft_config", None):
        transformer.fuse_lora()
        transformer.unload_lora()
    transformer.save_pretrained(out / "transformer")
    root = base_folder.parent if base_folder.name == "transformer" else None
    if root is not None and (root / "model_index.json").is_file():
        for entry in sorted(root.iterdir()):
            if entry.name == "transformer" or entry.name.startswith("."):
                continue
            if entry.name == "model_index.json":
                shutil.copyfile(entry, out / entry.name)
            else:
                os.symlink(entry.resolve(), out / entry.name)
    return out


def export(path: str | Path, fmt: str = "", out: str | Path | None = None) -> Path:
    """Export the checkpoint (or a run folder's newest) ``path``; returns what was written."""
    src = resolve_checkpoint(path)
    cfg, model, step = load_ema(src)
    if not getattr(model, "base", None):
        raise ExportError(f"{src}: model.arch={cfg.model.arch} was trained from scratch; export writes a "
                          "pretrained family's fine-tune (model.arch=wan)")
    fmt = fmt or ("lora" if cfg.train.finetune == "lora" else "full")
    if fmt == "lora" and cfg.train.finetune != "lora":
        raise ExportError(f"{src}: --format lora needs a train.finetune=lora run (this one is "
                          f"{cfg.train.finetune}); use --format full")
    dest = Path(out) if out else src.parent / "export" / src.stem
    if dest.exists() and any(dest.iterdir()):
        raise ExportError(f"{dest} exists and is not empty: nothing already saved is overwritten; give --out")
    dest.mkdir(parents=True, exist_ok=True)
    written = export_lora(model, dest) if fmt == "lora" else export_full(model, Path(model.base["folder"]), dest)
    (dest / "t2v_export.json").write_text(json.dumps({"checkpoint": str(src), "step": step, "format": fmt,
                                                      "base": model.base}, indent=2) + "\n")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2v.export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="checkpoint file or run folder (its newest valid checkpoint)")
    p.add_argument("--format", choices=FORMATS, default="",
                   help="lora (default for a LoRA run) or full (a whole pipeline folder)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export/ckpt_NNNNNN)")
    args = p.parse_args(argv)
    try:
        written = export(args.ckpt, args.format, args.out)
    except (ExportError, ckpt.CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {written}")
    if written.name == LORA_FILE:
        print(f"load it: pipe = WanPipeline.from_pretrained(BASE); pipe.load_lora_weights('{written.parent}')")
    else:
        print(f"load it: pipe = WanPipeline.from_pretrained('{written}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
