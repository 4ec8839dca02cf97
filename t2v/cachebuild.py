"""One sharded, resumable builder for every cache: plan a shard's rows, build a part, merge the parts, verify.

The clip and latent caches (t2v.data.cache, t2v.data.latents), the window caches (t2v.data.window_build) and the
caption embeddings (t2v.text.cache) plug in here with their own encoder, row shape and key; this module knows
only rows, files and the order they are written in:

* a shard is a contiguous slice of rows (``shard_rows``), so a merge is a concatenation in order;
* a part is ``<stem>.partIIII-of-NNNN`` + its suffixes; its last file is written last, so its presence means the
  part is finished (``check_parts``), and a rerun of a shard keeps a finished part;
* the merge verifies that the parts tile the rows exactly, writes the final array atomically, then its .json
  (the cache's "complete" mark), then removes the parts: a merge or shard rerun after it finds the .json, a no-op;
* a resumable build (``Partial``) fills ``<stem>.partial.npy`` in place and saves its state after the array is
  flushed, so the state never claims rows that are not on disk.

It imports neither t2v.data nor t2v.text: both use it.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from t2v.files import NoSpaceError, atomic_path, atomic_write, no_space, reserve, write_text
from t2v.progress import progress as progress_counter
from t2v.runlog import NO_SPACE_EXIT

log = logging.getLogger("t2v.data")


class CacheError(RuntimeError):
    pass


def no_room(e: BaseException, setting: str) -> int | None:
    """A cache command that found no room to write (t2v.files.no_space): its one line on stderr, and the exit code
    (NO_SPACE_EXIT); None when ``e`` is something else. ``setting``: the key that moves the cache elsewhere."""
    full = no_space(e)
    if full is None:
        return None
    print(f"error: {full}. Free space (or set {setting} to a folder with room), then run the same command again: "
          "what is finished is kept", file=sys.stderr)
    return NO_SPACE_EXIT


# --- planning: which rows a shard builds ---------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (0 <= I < N), as `--shard` takes it and a Slurm array task passes it -> (I, N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected I/N, e.g. 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: expected 0 <= I < N")
    return i, n


def shard_count(text: str) -> int:
    """``--merge N`` for argparse: a whole number >= 1."""
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected the number of shards (>= 1), got {text!r}")
    return int(text)


def shard_argument(text: str) -> tuple[int, int]:
    """parse_shard for argparse (its error becomes a usage error naming the option)."""
    import argparse

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def shard_rows(n: int, shard: int, shards: int) -> range:
    """Shard ``shard`` of ``shards``: a contiguous slice, so the merge is a concatenation in order."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: expected 0 <= I < N")
    return range(n * shard // shards, n * (shard + 1) // shards)


def part_name(stem: Path, shard: int, shards: int) -> str:
    """Part ``shard`` of ``shards`` of the cache whose files start with ``stem``; add the suffix."""
    return f"{stem}.part{shard:04d}-of-{shards:04d}"


@dataclass(frozen=True)
class Files:
    """The files of one array cache: ``<stem>.npy``, its ``.json`` (written last), parts, a partial build."""

    stem: Path  # <cache_dir>/<prefix>_<key>

    @property
    def npy(self) -> Path:
        return Path(f"{self.stem}.npy")

    @property
    def meta(self) -> Path:
        return Path(f"{self.stem}.json")

    def beside(self, suffix: str) -> Path:
        return Path(f"{self.stem}.{suffix}")

    def part(self, shard: int, shards: int) -> tuple[Path, Path]:
        name = part_name(self.stem, shard, shards)
        return Path(f"{name}.npy"), Path(f"{name}.json")

    def parts(self, shards: int) -> list[tuple[Path, Path]]:
        return [self.part(i, shards) for i in range(shards)]


# --- running the encoder --------------------------------------------------------------------------------------------

def run_jobs(fn, jobs: list, workers: int, progress: bool, desc: str):
    """``fn(job)`` for every job, in order, in ``workers`` processes (a progress bar over the jobs). ``fn`` must be
    a module-level function and deterministic, so any number of workers gives what one process gives.

    The workers are a ProcessPoolExecutor, not a multiprocessing.Pool: a worker that dies (a decoder crashing on
    a bad file, the OOM killer) makes the executor raise, where Pool.imap waits forever for the lost result."""
    bar = progress_counter(total=len(jobs), desc=desc, unit="clip", enabled=progress)
    pool = None
    if workers <= 1:
        results = map(fn, jobs)
    else:  # spawn: a fresh interpreter per worker, never a fork of a process that holds decoder state
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(fn, jobs, chunksize=4)
    try:
        for r in results:
            bar.update(1)
            yield r
    except BrokenProcessPool as e:
        raise CacheError(f"{desc}: a worker process died ({e}); no row it held was written. Rerun with --workers 1 "
                         "to see the error of the clip it was decoding") from None
    finally:
        bar.close()
        if pool is not None:  # after an error: drop the jobs not started, wait for the few running ones
            pool.shutdown(wait=True, cancel_futures=True)


class Every:
    """True at most once every ``seconds`` (the periodic saves of a resumable build)."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.time()

    def __call__(self) -> bool:
        if time.time() - self.last <= self.seconds:
            return False
        self.last = time.time()
        return True


def write_array(npy: Path, shape: tuple, dtype, fill: Callable[[np.ndarray], object]):
    """``fill(out)`` into a new .npy of ``shape`` written atomically (its own temporary file: several processes
    may build at once, the last rename wins with identical content); returns what ``fill`` returns."""
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        reserve(tmp)  # no room: an error now, not a SIGBUS halfway through the build
        got = fill(out)
        out.flush()
        del out  # unmapped before the rename
    return got


# --- shards: build a part, check, verify and assemble them ---------------------------------------------------------

def build_part(files: Files, key: str, shard: int, shards: int, merged: Callable[[], bool],
               write: Callable[[Path], tuple[range, dict]]) -> Path:
    """Part ``shard`` of ``shards``: ``write(part_npy)`` writes its array and returns (the rows it covers, more
    fields for its .json). A finished part is kept (rerunning a killed array job redoes only the unfinished
    shards), and nothing is built once ``merged()``. Returns the part's .npy."""
    part_npy, part_meta = files.part(shard, shards)
    if part_meta.is_file() or merged():
        return part_npy
    rows, extra = write(part_npy)
    write_text(part_meta, json.dumps({"key": key, "rows": [rows.start, rows.stop], **extra}))
    return part_npy


def check_parts(parts: Sequence[tuple[Path, ...]], what: str, error: type[Exception] = CacheError,
                noun: str = "shards") -> None:
    """Every part's last file is there (it is written last), else ``error`` naming the first that is not."""
    missing = [str(part[-1]) for part in parts if not part[-1].is_file()]
    if missing:
        raise error(f"{what}: {len(missing)} of {len(parts)} {noun} are not finished ({missing[0]} ...); "
                    "rerun them (finished ones are kept), then merge")


def read_parts(parts: list[tuple[Path, Path]], n: int, what: str, hint: str = "") -> list[dict]:
    """Each part's .json, in order, once they are seen to tile rows 0..n exactly: parts of another split (or
    grouping) never merge into a wrong file."""
    expect, metas = 0, []
    for _, part_meta in parts:
        meta = json.loads(part_meta.read_text())
        start, stop = meta["rows"]
        if stop > start:  # an empty shard (more shards than rows) holds nothing
            if start != expect:
                raise CacheError(f"{what}: {part_meta} covers rows {start}-{stop}, expected it to start at "
                                 f"{expect}{hint}")
            expect = stop
        metas.append(meta)
    if expect != n:
        raise CacheError(f"{what}: the {len(parts)} parts cover {expect} of {n} clips")
    return metas


def _concatenate(parts: list[tuple[Path, Path]], out: np.ndarray) -> None:
    row = 0
    for part_npy, _ in parts:
        part = np.load(part_npy, mmap_mode="r")
        out[row:row + len(part)] = part
        row += len(part)


def bad_of(metas: list[dict]) -> list[dict]:
    """The bad clips the parts recorded, in index order (the parts are in order)."""
    return [b for meta in metas for b in meta["bad"]]


def remove_parts(parts: Sequence[tuple[Path, ...]]) -> None:
    for part in parts:
        for path in part:
            path.unlink(missing_ok=True)


def merge_parts(files: Files, shards: int, n: int, what: str, row: tuple, dtype,
                write_meta: Callable[[list[dict]], None], hint: str = "") -> list[dict]:
    """The ``shards`` parts, checked and verified to tile the ``n`` rows, concatenated into the file one build
    writes (the same bytes), atomically; then ``write_meta(the parts' .json)`` marks it complete and the parts
    are removed. Returns the parts' .json in order."""
    parts = files.parts(shards)
    check_parts(parts, what)
    metas = read_parts(parts, n, what, hint)
    rows = sum(len(np.load(p, mmap_mode="r")) for p, _ in parts)
    write_array(files.npy, (rows, *row), dtype, lambda out: _concatenate(parts, out))
    write_meta(metas)
    remove_parts(parts)
    return metas


# --- resumable builds -----------------------------------------------------------------------------------------------

class Partial:
    """A build filled in place in ``<stem>.partial.npy``, with state files beside it saying which rows are on
    disk: a killed build resumes from them (if they fit) instead of starting over."""

    def __init__(self, files: Files, shape: tuple, dtype, states: Sequence[Path], load_state: Callable[[], object]):
        self.path, self.npy, self.states = files.beside("partial.npy"), files.npy, tuple(states)
        self.out, self.state = None, None
        if self.path.is_file() and all(p.is_file() for p in self.states):
            try:
                out, state = np.lib.format.open_memmap(self.path, mode="r+"), load_state()
                if out.shape == shape and out.dtype == np.dtype(dtype) and state is not None:
                    self.out, self.state = out, state
            except (OSError, ValueError):
                pass
            if self.out is None:
                log.warning("the partial build in %s does not fit; starting over", self.path)
        if self.out is None:
            self.out = np.lib.format.open_memmap(self.path, mode="w+", dtype=dtype, shape=shape)
            try:
                reserve(self.path)  # no room: an error now, not a SIGBUS halfway through the build
            except OSError as e:
                self.out = None
                self.path.unlink(missing_ok=True)  # it holds nothing yet
                raise NoSpaceError(self.path, e) from None

    def save(self, states: Sequence[bytes]) -> None:
        """Write the state files (in ``states`` order): only after the array, so they never run ahead of it."""
        self.out.flush()
        for path, blob in zip(self.states, states):
            with atomic_write(path) as f:
                f.write(blob)

    def finish(self) -> None:
        """The partial array becomes the cache's .npy; the caller then writes its .json."""
        self.out.flush()
        self.out = None  # unmapped before the rename
        os.replace(self.path, self.npy)
        for p in self.states:
            p.unlink(missing_ok=True)
