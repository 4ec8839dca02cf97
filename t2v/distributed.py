"""torch.distributed set-up in one place: ranks from torchrun or from Slurm's srun tasks.

One process (the laptop, the login node, `python -m t2v.train`) needs no set-up at all. Under torchrun the
RANK/WORLD_SIZE/LOCAL_RANK variables are set; under `srun` with several tasks Slurm sets SLURM_PROCID,
SLURM_NTASKS and SLURM_LOCALID, and the job script exports MASTER_ADDR/MASTER_PORT for the rendezvous.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def detect(env=os.environ) -> Dist:
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
        return Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun -n N
        return Dist(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Dist()


def init(device_type: str) -> Dist:
    d = detect()
    if d.enabled and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend, rank=d.rank, world_size=d.world_size)
    return d


def reduce_step(loss: torch.Tensor, flag: bool, d: Dist) -> tuple[float, bool]:
    """(mean loss over ranks, flag set on any rank) in one all-reduce: a signal delivered to one rank stops
    them all at the same step, and a non-finite loss anywhere is seen everywhere."""
    if not d.enabled:
        return loss.item(), flag
    t = torch.stack([loss.float(), torch.tensor(1.0 if flag else 0.0, device=loss.device)])
    dist.all_reduce(t)
    return t[0].item() / d.world_size, bool(t[1].item() > 0)


def broadcast_object(obj, d: Dist):
    """Rank 0's ``obj`` on every rank (a small picklable value, e.g. which checkpoint to resume from)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
