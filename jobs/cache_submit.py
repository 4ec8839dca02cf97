"""`make cache-submit SHARDS=N`: build a cache on Slurm as a job array of N shards plus a merge job.

    make cache-submit SHARDS=16 CONFIG=configs/latent.yaml [KIND=clips|latents|text] [PROFILE=zaratan] [TIME=...]

KIND: ``clips`` (default) the clip cache, decoded on CPU nodes; ``latents`` the VAE latent cache and ``text`` the
caption embeddings, each task on one GPU of the profile (GPUS=0: CPU).

Settings are those of `make submit` (profile, CONFIG, MANIFEST, FRAMES, SIZE, key=value arguments), resolved and
validated the same way, rendered through the same profiles and jobs/render.py (templates/cache.sbatch). Each
array task decodes its slice with as many processes as the profile gives it CPUs; the merge job waits for the
whole array (--dependency=afterok) and writes the cache file a single process would. The two scripts stay in the
run folder: resubmit the array script to rerun killed shards (finished parts are kept), then the merge script.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Mapping

from jobs import render
from jobs.submit import SubmitError, _sbatch, resolve


def scripts(env: Mapping[str, str], overrides=(), profile: str | None = None, **resolve_kw):
    """(submission, shards, array script, merge script) for these settings; nothing is written or queued.
    ``resolve_kw`` (cwd, now, token) go to jobs.submit.resolve (golden files fix the clock and the token)."""
    env = {"JOB_NAME": "t2v-cache", **env}
    raw = str(env.get("SHARDS", "")).strip()
    if not raw.isdigit() or int(raw) < 1:
        raise SubmitError(f"SHARDS must be a whole number >= 1 (got {raw!r}), e.g. make cache-submit SHARDS=8")
    shards = int(raw)
    kind = str(env.get("KIND", "")).strip() or "clips"
    sub = resolve(env, overrides, profile=profile, **resolve_kw)
    s = dataclasses.replace(sub.settings, tasks=None)  # one task per job; render_cache picks GPU or CPU by kind
    sub = dataclasses.replace(sub, settings=s)
    return sub, shards, render.render_cache(sub.profile, s, shards, merge=False, kind=kind), \
        render.render_cache(sub.profile, s, shards, merge=True, kind=kind)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.cache_submit", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=None)
    p.add_argument("--dry-run", action="store_true", help="print both scripts, submit nothing (= DRY_RUN=1)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    env = dict(os.environ)
    if args.dry_run:
        env["DRY_RUN"] = "1"
    try:
        sub, shards, array, merge = scripts(env, args.overrides, args.profile)
        run = Path(sub.settings.run_dir)
        array_path, merge_path = run / "cache_array.sbatch", run / "cache_merge.sbatch"
        if sub.dry_run:
            print(f"DRY_RUN: nothing submitted; would write {array_path} and {merge_path}", file=sys.stderr)
            print(f"{array}# ---- {merge_path} ----\n{merge}", end="")
            return 0
        run.mkdir(parents=True, exist_ok=True)
        if sub.config_src:
            shutil.copyfile(sub.config_src, run / "job_config.yaml")
        array_path.write_text(array)
        merge_path.write_text(merge)
        array_id = _sbatch(render.sbatch_command(str(array_path)))
        # a failed shard makes the dependency unsatisfiable: Slurm then cancels the merge instead of keeping it pending
        merge_id = _sbatch(render.sbatch_command(str(merge_path), f"afterok:{array_id}", ["--kill-on-invalid-dep=yes"]))
    except (SubmitError, render.RenderError, OSError) as e:
        print(f"cache-submit: {e}", file=sys.stderr)
        return 2
    print(f"submitted job array {array_id} ({shards} shards) and merge job {merge_id} (after the array)")
    print(f"  builds: {env.get('KIND') or 'clips'}")
    print(f"  logs:   {run}/cache-{array_id}_<shard>.out, {run}/cache-merge-{merge_id}.out")
    print(f"  rerun killed shards: sbatch --parsable {shlex.quote(str(array_path))}, then sbatch "
          f"--dependency=afterok:<that id> {shlex.quote(str(merge_path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
