"""torch.distributed set-up in one place: ranks from torchrun or from Slurm's srun tasks.

One process (the laptop, the login node, `python -m t2v.train`) needs no set-up at all. Under torchrun the
RANK/WORLD_SIZE/LOCAL_RANK variables are set; under `srun` with several tasks Slurm sets SLURM_PROCID,
SLURM_NTASKS and SLURM_LOCALID, and the job script exports MASTER_ADDR (its first node) and MASTER_PORT=0.

MASTER_PORT=0 in a Slurm job: rank 0 listens on a port the kernel picks and writes it to a file in the run
folder (which every rank reads anyway: checkpoints), named by job id and restart, where the other ranks find it.
No port is derived from the job id, so two jobs that share a node cannot meet on one port.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


class DistError(RuntimeError):
    """The ranks could not meet, or lost each other: a collective did not complete within train.dist_timeout_s,
    a peer's connection closed (a rank crashed, hung, or lost its node), or the rendezvous failed."""


def init(device_type: str, timeout_s: float = 600.0, run_dir: str | Path | None = None, alone: bool = False) -> Dist:
    """Join the process group. ``timeout_s`` bounds every collective, gloo's and NCCL's alike (torch's defaults
    differ: 30 min for gloo, 10 for NCCL), and the rendezvous itself. ``run_dir`` carries rank 0's port to the
    others when MASTER_PORT=0. ``alone``: a group even for one process (FSDP's sharding over one rank is the same
    code path as over many, which is how one GPU checks it), with an in-memory store and no port."""
    d = detect()
    if alone and not d.enabled and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=timeout_s))
    if d.enabled and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(d.local_rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = None
        if os.environ["MASTER_PORT"] == "0":
            if run_dir is None or "SLURM_JOB_ID" not in os.environ:
                raise DistError("MASTER_PORT=0 (a port picked by rank 0) needs a Slurm job and its run folder")
            store = _store_through(Path(run_dir), d, timeout_s)
        dist.init_process_group(backend, store=store, rank=d.rank, world_size=d.world_size, timeout=timeout)
    return d


def _rendezvous_file(run_dir: Path) -> Path:
    return run_dir / f".rendezvous-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def _store_through(run_dir: Path, d: Dist, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store: rank 0 listens on a free port and publishes it in the run folder; the others wait
    for the file (at most timeout_s) and connect. MASTER_PORT is set to the real port on every rank."""
    host, path = os.environ["MASTER_ADDR"], _rendezvous_file(run_dir)
    timeout = datetime.timedelta(seconds=timeout_s)
    if d.is_main:
        store = dist.TCPStore(host, 0, d.world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        run_dir.mkdir(parents=True, exist_ok=True)
        for old in run_dir.glob(".rendezvous-*"):  # earlier attempts' files (a killed job leaves its own)
            old.unlink(missing_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(str(store.port))
        os.replace(tmp, path)  # whole or absent: a rank never reads half a port
        port = store.port
    else:
        deadline = time.monotonic() + timeout_s
        while not path.is_file():  # on NFS a new file can take a few seconds to show on another node
            if time.monotonic() > deadline:
                raise DistError(f"rank {d.rank} on {node_name()}: rank 0 did not publish its port in {path} within "
                                f"train.dist_timeout_s={timeout_s:g} s (is the run folder on a file system "
                                "every node sees?)")
            time.sleep(0.1)
        port = int(path.read_text())
        store = dist.TCPStore(host, port, d.world_size, is_master=False, timeout=timeout)
    os.environ["MASTER_PORT"] = str(port)
    return store


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def rank_nodes(d: Dist) -> list[str]:
    """The node each rank runs on, by rank (one name per process, gathered from all ranks)."""
    if not d.enabled:
        return [node_name()]
    names: list = [None] * d.world_size
    dist.all_gather_object(names, node_name())
    return names


def describe_nodes(nodes: list[str]) -> str:
    """['tn1', 'tn2'] -> 'rank 0 on tn1, rank 1 on tn2'; many ranks per node are grouped: 'ranks 0-3 on gpu1, ...'."""
    groups: list[tuple[str, list[int]]] = []
    for rank, node in enumerate(nodes):
        if groups and groups[-1][0] == node:
            groups[-1][1].append(rank)
        else:
            groups.append((node, [rank]))
    return ", ".join(f"rank {r[0]} on {n}" if len(r) == 1 else f"ranks {r[0]}-{r[-1]} on {n}" for n, r in groups)


def lost_ranks(e: BaseException, d: Dist, timeout_s: float) -> DistError | None:
    """A DistError for an error raised by a collective that timed out or lost its peer (torch raises these as
    RuntimeError and its subclasses, with gloo's or NCCL's words), else None."""
    if isinstance(e, DistError):
        return e
    if not d.enabled or not isinstance(e, RuntimeError):
        return None
    text = str(e)
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        what = (f"no answer from the other ranks within train.dist_timeout_s={timeout_s:g} s: a rank hung, or its "
                "node stopped responding")
    elif "connection closed by peer" in low or "connection reset" in low or "broken pipe" in low:
        what = "another rank closed its connection: it crashed, was killed, or lost its node"
    else:
        return None
    first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    return DistError(f"rank {d.rank} on {node_name()}: {what}; the job log shows which rank stopped first "
                     f"({first})")


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


def gather_object(obj, d: Dist) -> list:
    """Every rank's ``obj``, by rank, on every rank ([obj] on one process)."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist, run_dir: str | Path | None = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        if d.is_main and d.enabled and run_dir is not None and "SLURM_JOB_ID" in os.environ:
            _rendezvous_file(Path(run_dir)).unlink(missing_ok=True)


def exit_process(code: int) -> None:
    """End this process with ``code``. A process that was one of several ranks leaves through ``os._exit`` once its
    output is flushed. The cause it avoids: DDP's module sits in a reference cycle, so gloo's process group outlives
    ``destroy_process_group`` until the garbage collector runs during interpreter finalisation, where the
    destructor of gloo's worker thread takes the GIL of a dying interpreter and the process aborts ("terminate
    called without an active exception", rc -6; pytorch#190489). Here that hit about 1 two-rank run in 8, and would
    turn a run that finished, or saved for a requeue, into a failed job (tests/test_fsdp.py runs it 24 times).
    Nothing is left to run at this point: the loop has saved, closed its logs and left the group. A single process
    exits the ordinary way."""
    if not detect().enabled:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    os._exit(code)
