"""Files that are never torn, and names that are safe on any file system.

Every file the toolkit writes for later (checkpoints, caches, manifests, configs, reports) goes through
``atomic_path``: the content is written to a temporary name in the same folder, flushed to disk, and renamed over
the final name, so a job killed at any moment leaves the old file or the new one, never half of one. The temporary
name is ``.<name>.tmp-<pid>``: one per process, so that several processes building the same cache never write
into each other's file (the last rename wins, with identical content).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


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
    ``path``, on an exception removed (``path`` untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
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
