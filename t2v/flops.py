"""Model FLOPs a training step, counted once, and MFU: the fraction of the card's peak a run turns into model math.

The count runs the model's forward and backward on one clip of the run's shape under
``torch.utils.flop_counter.FlopCounterMode`` (which counts every matmul, convolution and attention as executed), in
eval mode on the plain model, before DDP or FSDP wrap it. The backward is ``torch.autograd.grad`` towards what
trains, so a frozen base's weight gradients, which the step never computes, are not counted either, and no
``.grad`` and no random state is touched. Recomputation (model.checkpointing) is not counted: MFU is "model FLOPs
utilisation", the useful math over the peak (PaLM's definition), so a run that recomputes shows a lower MFU.

Peaks are dense (no 2:4 sparsity) tensor-core TFLOP/s from NVIDIA's data sheets, for the precision the matmuls
run in; a MIG slice gets its share of the card (``3g.20gb``: 3/7). ``train.peak_tflops`` overrides the table, for
another card, or on CPU to test the arithmetic.
"""
from __future__ import annotations

import re

import torch

# card -> precision -> dense TFLOP/s (bf16 = fp16 on these; "tf32" is fp32 matmuls with TF32 allowed)
PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0},  # SXM
    "H200": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0},
}
MIG_SLICES = 7  # compute slices of an A100 or H100


def peak_tflops(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """The table's peak for a card named ``device_name`` (torch.cuda.get_device_name) in ``precision``, None for a
    card it does not know."""
    kind = ("bf16" if precision in ("bf16", "fp16") else "tf32" if tf32 else "fp32")
    for card in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        words = card.split()
        if all(w.lower() in device_name.lower() for w in words):
            mig = re.search(r"MIG (\d)g", device_name)
            return PEAK_TFLOPS[card][kind] * (int(mig.group(1)) / MIG_SLICES if mig else 1.0)
    return None


def count(fn) -> int:
    """FLOPs ``fn()`` executes (FlopCounterMode; a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def train_flops_per_clip(model: torch.nn.Module, example: dict, model_time: torch.Tensor) -> int:
    """Forward and backward FLOPs of one training clip: ``model(**example)`` at ``model_time``, gradients towards
    the parameters that train. Leaves the model's mode, gradients and every RNG as they were."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()  # dropout draws from the global RNG; the FLOPs are the same

    def step():
        out = model(example["x"], model_time, example["text"], tokens=example.get("tokens"),
                    token_mask=example.get("token_mask"), fps=example.get("fps"))
        if trainable:
            torch.autograd.grad(out.float().square().mean(), trainable)

    try:
        return count(step)
    finally:
        model.train(was_training)


def mfu(flops_per_step: int, steps: int, seconds: float, ranks: int, peak: float | None) -> float | None:
    """Achieved model TFLOP/s a rank over the card's peak (None without a peak)."""
    if not peak or seconds <= 0:
        return None
    return flops_per_step * steps / seconds / ranks / (peak * 1e12)
