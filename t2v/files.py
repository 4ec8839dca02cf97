"""Files that are never torn, and names that are safe on any file system.

Every file the toolkit writes for later (checkpoints, caches, manifests, configs, reports) goes through
``atomic_path``: the content is written to a temporary name in the same folder, flushed to disk, and renamed over
the final name, so a job killed at any moment leaves the old file or the new one, never half of one. The temporary
name is ``.<name>.tmp-<pid>``: one per process, so that several processes building the same cache never write
into each other's file (the last rename wins, with identical content).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

# Tests only (tests/test_chaos.py, tests/test_fsdp.py): pause this many seconds halfway through writing a checkpoint
# (a file: after half its bytes; a sharded folder: after its shards, before its rename), so that a SIGKILL sent while
# the pause lasts lands inside a save.
SAVE_PAUSE_ENV = "T2V_TEST_SAVE_PAUSE_S"


# A write refused for want of room: a full disk, an exceeded quota (Zaratan's scratch and home), a file size limit
NO_SPACE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                   errno.EFBIG: "a file size limit (ulimit -f) is reached"}


class NoSpaceError(OSError):
    """A write that found no room, said in one line: where, why, and how much is left."""

    def __init__(self, path: str | os.PathLike, err: OSError):
        super().__init__(err.errno, NO_SPACE_ERRNOS.get(err.errno, err.strerror), str(path))
        self.path = Path(path)
        self.free = free_bytes(self.path)

    def __str__(self) -> str:
        left = f"{human_bytes(self.free)} free on its file system" if self.free is not None else "free space unknown"
        return f"no room to write {self.path}: {self.strerror} ({left})"


def no_space(exc: BaseException | None) -> NoSpaceError | None:
    """The full disk, quota or size limit behind ``exc`` (itself, or what it was raised from or during: torch.save
    reports one as a RuntimeError of its zip writer) as a NoSpaceError, or None if it is something else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NoSpaceError):
            return exc
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return NoSpaceError(exc.filename or "a file", exc)
        exc = exc.__cause__ or exc.__context__
    return None


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free on the file system of ``path`` (or of its nearest existing parent), None if unknown. A quota
    may leave less than this to its user: only a failed write tells."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units, as df -h)."""
    unit = next((u for u in ("TiB", "GiB", "MiB", "KiB") if n >= 2 ** (10 * ("KMGT".index(u[0]) + 1))), "B")
    return f"{n:.0f} B" if unit == "B" else f"{n / 2 ** (10 * ('KMGT'.index(unit[0]) + 1)):.2f} {unit}"


def reserve(path: str | os.PathLike) -> None:
    """Allocate the blocks of a file about to be filled through a memory map (a sparse .npy): on a full disk or
    quota this fails now with ENOSPC, where a write through the map would kill the process with SIGBUS. File
    systems without fallocate keep the sparse file."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in NO_SPACE_ERRNOS:
            raise
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where the OS cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it is fsync'ed and renamed over
    ``path``, on an exception removed (``path`` untouched). A write that found no room raises NoSpaceError, once
    the temporary file is gone (so the free space it reports is what there is)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        full = no_space(e)
        if full is not None and not isinstance(e, NoSpaceError):
            raise NoSpaceError(path, full) from e  # named by the file it was writing
        raise
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """``open(path, mode)`` whose content replaces ``path`` atomically when the block ends without an error."""
    with atomic_path(path, fsync) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f
        f.flush()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, record) -> Path:
    return write_text(path, json.dumps(record, indent=2) + "\n")


def slug(text: str, max_len: int = 80, default: str = "x", digest: bool = False) -> str:
    """A file-name-safe form of ``text``: runs of other characters become ``_``. With ``digest``, a short hash
    of the full text is appended, so distinct texts that read alike (or were cut at ``max_len``) never collide."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:max_len] or default
    return f"{readable}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}" if digest else readable
