"""How the model is spread over the ranks: ``train.parallel=ddp`` or ``fsdp``.

ddp   every rank holds the whole model, its gradients and its Adam state (16 bytes a parameter in mixed precision)
      and DDP all-reduces the gradients; the checkpoint is one file rank 0 writes.
fsdp  FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank holds 1/N of every parameter, gradient, Adam state
      and EMA weight, all-gathers a block's weights just before the block runs and reduce-scatters its gradients
      after; the checkpoint is a folder every rank writes its shard into (t2v.sharded).

Sharding follows torchtitan: each of the model's blocks (its ``fsdp_units()``) is one unit, then the root holds what
is left (embeddings, the output layer), so at most one block's full weights exist at a time beyond the shards. The
EMA is sharded the same way, so its update is a local ``lerp_`` on matching shards. On GPUs in bf16 the weights are
gathered in bf16 and gradients reduced in fp32 (``MixedPrecisionPolicy``); elsewhere both stay in fp32, where DDP
and FSDP at the same global batch compute the same losses (tests/test_fsdp.py).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def units(model: nn.Module) -> list[nn.Module]:
    """The blocks each sharded as one unit: the model's own ``fsdp_units()`` (every denoiser in t2v.models says)."""
    if not hasattr(model, "fsdp_units"):
        raise TypeError(f"{type(model).__name__} does not say how to shard it (an fsdp_units() method)")
    return list(model.fsdp_units())


def shard(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over the default process group: each unit, then the root. Returns it (now also an
    ``FSDPModule``, with DTensor parameters)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 weights for the matmuls, fp32 for the gradient reduction (the sum of N bf16 shards loses bits)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" and device.type == "cuda" else MixedPrecisionPolicy())
    # torch warns that the root returns a view, into which an in-place op would skip a hook: no caller of a
    # denoiser changes its output in place (t2v.step, t2v.objective, t2v.validate)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for unit in units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def reshard(module: nn.Module) -> None:
    """Put a sharded module's root back into shards after a forward without backward (the EMA's, for previews and
    validation): FSDP keeps the root's gathered weights after its forward, expecting the backward to need them, and
    the EMA's next update needs shards."""
    if hasattr(module, "reshard"):
        module.reshard()


def local(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a clipped gradient norm: replicated, so no communication), else ``x``."""
    return x.full_tensor() if isinstance(x, DTensor) else x


@contextmanager
def gradient_sync(net: nn.Module, sync: bool):
    """One micro-batch's forward and backward: without ``sync`` the gradients accumulate locally and the ranks
    exchange them on the last micro-batch only (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``). A
    model on one process has neither and always "syncs"."""
    if sync or not (hasattr(net, "no_sync") or hasattr(net, "set_requires_gradient_sync")):
        yield
    elif hasattr(net, "no_sync"):
        with net.no_sync():
            yield
    else:
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
