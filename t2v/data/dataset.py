"""Training dataset and a sampler indexed by step, which is what makes a resumed run bit-exact.

Every sample is named by its global position p in the stream of samples (p = step * global_batch + j).
Which clip it is (a per-epoch permutation), which caption (pick_caption) and which window are all pure
functions of (seed, p), so restarting at step s with any number of GPUs replays exactly the samples an
uninterrupted run would have seen, with no sampler or worker state in the checkpoint.
"""
from __future__ import annotations

import itertools
import logging
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from t2v.data.cache import ClipCache
from t2v.data.manifest import Clip, pick_caption
from t2v.data.video import FrameSize, VideoError, decode_uint8, describe_size, frame_hw, to_model
from t2v.data.windows import decode_clip, pick_window

log = logging.getLogger("t2v.data")


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) so nearby pairs give unrelated permutations, with no collisions
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g)


class StepSampler:
    """Batches of (index, draw) pairs for a DataLoader's ``batch_sampler``, one batch per training step.

    Rank r of w gets the slice [r*b, (r+1)*b) of each global batch (b = global_batch // w), so the global
    order of samples is the same for any world size. Infinite unless ``steps`` is given.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        steps: int | None = None,
    ):
        if n < 1:
            raise ValueError(f"need at least one clip, got n={n}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy's SeedSequence takes no negative seeds), got {seed}")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} must be a positive multiple of the world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if start_step < 0 or (steps is not None and steps < start_step):
            raise ValueError(f"bad step range: start_step={start_step}, steps={steps}")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.start_step, self.steps = start_step, steps
        self.rank, self.world_size = rank, world_size
        self.per_rank = global_batch // world_size
        self._perms: dict[int, torch.Tensor] = {}

    def _index(self, p: int) -> int:
        epoch = p // self.n
        if epoch not in self._perms:
            if len(self._perms) > 4:  # a step touches at most a few epochs; keep memory flat
                self._perms.clear()
            self._perms[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return int(self._perms[epoch][p % self.n])

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This rank's (index, draw) pairs at ``step``."""
        first = step * self.global_batch + self.rank * self.per_rank
        return [(self._index(p), p) for p in range(first, first + self.per_rank)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        steps = itertools.count(self.start_step) if self.steps is None else range(self.start_step, self.steps)
        for step in steps:
            yield self.batch(step)

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("StepSampler without steps= is infinite and has no length")
        return self.steps - self.start_step


class Embeddings(Protocol):
    def get(self, caption: str) -> torch.Tensor: ...


class ClipDataset(torch.utils.data.Dataset):
    """Items are addressed by (index, draw) from StepSampler; a plain int i means (i, i).

    A clip that cannot be decoded (or is marked bad in the cache) is replaced by the next index, so
    the replacement is the same on every run. ``bad`` in the item counts decode failures met while
    fetching it; clips the cache already knows to be bad were reported when it was built and are not
    counted again every epoch against data.max_bad_clips.
    """

    def __init__(
        self,
        clips: Sequence[Clip],
        embeddings: Embeddings,
        frames: int,
        size: FrameSize,
        seed: int,
        sampling: str = "even",
        window: float = 0.5,
        cache: ClipCache | None = None,
        latents=None,  # a t2v.data.latents.LatentCache: items carry the VAE posterior instead of pixels
        windows=None,  # data.sampling=window: a t2v.data.windows WindowCache (pixels) or LatentWindowCache
        strides: Sequence[int] = (1,),
        pad: bool = False,  # window: a clip with no room for a window gives its longest shot, padded
        rate=None,  # window without a cache: a t2v.data.windows.Rate, every draw decodes its clip
    ):
        if not clips:
            raise ValueError("ClipDataset needs at least one clip")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy's SeedSequence takes no negative seeds), got {seed}")
        if sampling == "window" and windows is None and rate is None:
            raise ValueError("sampling='window' needs the window cache (windows=) or, to decode per sample, rate=")
        if sampling == "window" and latents is not None:
            raise ValueError("sampling='window' reads the latent window cache (windows=), not the 'even' latents=")
        if windows is not None and len(windows) != len(clips):
            raise ValueError(f"window cache {windows.npy} holds {len(windows)} clips, expected {len(clips)}")
        if cache is not None:
            if sampling != "even":
                raise ValueError(f"the clip cache holds 'even' sampling only, not {sampling!r}: set data.cache=false")
            if len(cache) != len(clips) or (cache.frames, frame_hw(cache.size)) != (frames, frame_hw(size)):
                raise ValueError(
                    f"clip cache {cache.npy} holds {len(cache)} clips of {cache.frames}x{describe_size(cache.size)}, "
                    f"expected {len(clips)} of {frames}x{describe_size(size)}"
                )
        self.clips, self.embeddings = list(clips), embeddings
        self.frames, self.size, self.seed = frames, size, seed
        self.sampling, self.window, self.cache = sampling, window, cache
        if latents is not None and (len(latents) != len(clips) or
                                    (latents.frames, frame_hw(latents.size)) != (frames, frame_hw(size))):
            raise ValueError(f"latent cache {latents.npy} holds {len(latents)} clips of {latents.frames}x"
                             f"{describe_size(latents.size)}, expected {len(clips)} of {frames}x{describe_size(size)}")
        self.latents = latents
        self.windows, self.strides, self.pad, self.rate = windows, tuple(strides), pad, rate

    def __len__(self) -> int:
        return len(self.clips)

    def _frames(self, i: int, draw: int) -> tuple[np.ndarray, float] | None:
        """(frames, fps) of clip i at this draw: (T, H, W, 3) uint8, or in latent space its (2, T, C, h, w)
        posterior; fps 0 where the rate is unknown ("even" spreads frames over the clip). None if it is bad."""
        if self.latents is not None:
            return None if i in self.latents.bad else (self.latents.get(i), 0.0)
        if self.cache is not None:
            return None if i in self.cache.bad else (self.cache.get(i), 0.0)
        # a stream separate from pick_caption's ([seed, draw]) so window and caption are independent
        rng = np.random.default_rng([self.seed, draw, 1])
        if self.sampling == "window":
            return self._window(i, rng)
        clip = self.clips[i]
        try:
            return decode_uint8(clip.video, self.frames, self.size, self.sampling, self.window, rng, clip.start,
                                clip.end), 0.0
        except VideoError as e:
            log.warning("skipping clip (manifest line %d): %s", clip.line, e)
            return None

    def _window(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, float] | None:
        if self.windows is not None:
            got = self.windows.window(i, self.frames, self.strides, rng, self.pad)
            if got is None:
                return None
            rows, fps = got
            return self.windows.item(rows), fps  # pixels t h w c, or a posterior 2 t c h w
        clip = self.clips[i]
        try:
            u8, plan, shots = decode_clip(str(clip.video), self.size, self.rate, clip.start, clip.end)
        except VideoError as e:
            log.warning("skipping clip (manifest line %d): %s", clip.line, e)
            return None
        got = pick_window(len(u8), shots, self.frames, self.strides, rng, self.pad)
        return None if got is None else (u8[got[0]], plan.fps / got[1])

    def __getitem__(self, item) -> dict:
        index, draw = (int(item), int(item)) if isinstance(item, (int, np.integer)) else map(int, item)
        n = len(self.clips)
        i = index % n
        for skipped in range(n):
            got = self._frames(i, draw)
            if got is not None:
                u8, fps = got
                break
            i = (i + 1) % n
        else:
            raise RuntimeError(f"none of the {n} clips could be decoded (first: {self.clips[0].video})")
        caption = pick_caption(self.clips[i].captions, self.seed, draw)
        text = self.embeddings.get(caption)
        # the caches reported their bad (and too short) clips when they were built: not counted again
        bad = 0 if self.cache is not None or self.latents is not None or self.windows is not None else skipped
        item = {"text": text, "caption": caption, "index": i, "bad": bad, "fps": torch.tensor(fps, dtype=torch.float32)}
        if u8.dtype != np.uint8:  # 2 t c h w: the posterior's mean and std, float16 on disk
            return {"latent": torch.from_numpy(np.array(u8, dtype=np.float32)), **item}
        return {"video": to_model(u8), **item}
