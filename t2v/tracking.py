"""The run's records, also where people already look: TensorBoard event files in OUTDIR/tensorboard, and a
Weights & Biases run in OUTDIR/wandb (offline by default: compute nodes have no internet).

A tracker is a sink of t2v.runlog.RunLog: it receives exactly the records metrics.jsonl receives (loss records,
events), plus the preview grids, so TensorBoard shows the same run the reports show, from the same stream.
Only rank 0 has a RunLog that writes, so only rank 0 writes event files.

Resumes: a requeued or killed run continues from its checkpoint at step N, and steps after N that the earlier
process had already logged are logged again. The writer of a resumed run is opened with ``purge_step=N + 1``:
TensorBoard then drops what the earlier files hold from step N + 1 on, so every step shows once, in order
(the `SessionLog.START` mechanism of TensorBoard's own readers). A run killed mid-write leaves a truncated last
record, which TensorBoard's readers skip; the next process writes a new file.

W&B: the run id is kept in OUTDIR/wandb-run-id, so every requeue continues the same W&B run (an offline run dir
per process, all with that id, uploaded in order by `wandb sync`). W&B history steps must rise, and a step sent
twice is not replaced, so each process first asks what W&B already holds (the earlier offline files, read by
W&B's own reader, or the server's last step online) and sends only later steps. What a kill -9 cut from W&B's
buffer before it reached the file is sent again from metrics.jsonl; a resume is bit-exact, so those values are
the ones the resumed process would log.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from t2v import runlog
from t2v.files import no_space

# loss-record fields shown as scalars, under train/
SCALARS = ("loss", "lr", "grad_norm", "clips_per_s", "step_time", "gpu_mem_gib", "mfu")
MARKED = (runlog.START, runlog.RESUME, runlog.PREEMPT, runlog.DONE, runlog.PREVIEW_FAILED)


def scalars(rec: dict) -> dict[str, float]:
    """The scalars of one metrics.jsonl record, by tracker tag: train/<field> of a loss record, val/<field> of a
    validation record, run/restart at a start or resume (a line that steps up at every restart)."""
    name = rec.get("event")
    if name is None:
        keys = [k for k in SCALARS if k in rec]
        prefix = "train"
    elif name == runlog.VAL:
        keys = [k for k in rec if k.startswith("val_loss")]
        prefix = "val"
    elif name in (runlog.START, runlog.RESUME):
        return {"run/restart": rec.get("restart", 0)}
    else:
        return {}
    return {f"{prefix}/{k}": rec[k] for k in keys if isinstance(rec[k], (int, float)) and not isinstance(rec[k], bool)}


def _quiet_no_room(args) -> None:
    """threading.excepthook: TensorBoard's writer thread, finding the disk full, would print its traceback; the
    same error reaches the training thread at the writer's next call, which says it in one line."""
    if no_space(args.exc_value) is None:
        _THREAD_HOOK(args)


_THREAD_HOOK = threading.excepthook


class TensorBoard:
    """Event files under ``logdir``. ``resumed_at``: the checkpoint step a resumed run goes on from (None when
    fresh), after which earlier files' records are purged. ``config``: the resolved config as YAML, shown as text
    at the step the run (re)starts from."""

    def __init__(self, logdir: str | Path, resumed_at: int | None = None, config: str = ""):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise runlog.TrainingError(f"train.tensorboard=true needs the tensorboard package ({e}); pip install "
                               "tensorboard, or set train.tensorboard=false") from None
        self.logdir = Path(logdir)
        threading.excepthook = _quiet_no_room
        self.writer = SummaryWriter(str(self.logdir), purge_step=None if resumed_at is None else resumed_at + 1,
                                    flush_secs=30)
        if config:  # indented: TensorBoard renders text as Markdown, and this keeps it a code block
            self.writer.add_text("config", "\n".join("    " + line for line in config.splitlines()), resumed_at or 0)

    def record(self, rec: dict) -> None:
        step = rec.get("step")
        if not isinstance(step, int):
            return
        for tag, value in scalars(rec).items():
            self.writer.add_scalar(tag, value, step)
        name = rec.get("event")
        if name in MARKED:  # restart markers: run/restart above, and the event in words
            detail = ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("event", "step", "time"))
            self.writer.add_text("run/events", f"{name} at step {step}" + (f" ({detail})" if detail else ""), step)
        self.writer.flush()  # a kill -9 loses at most what came after the last record

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG the run wrote (a preview grid), as an image at ``step``."""
        import matplotlib.image

        pixels = matplotlib.image.imread(str(path))  # h w c, floats in [0, 1]
        self.writer.add_image(tag, pixels[..., :3], step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


RUN_ID_FILE = "wandb-run-id"
FLUSH_S = 2.0  # W&B writes its .wandb file this often (its default, 15 s, is what a kill -9 would cut)
INIT_TIMEOUT_S = 30  # online: how long wandb.init may try to reach the server before we log offline instead


def wandb_history(path: str | Path) -> list[dict]:
    """The history rows of an offline run's .wandb file (a run dir or the file), read by W&B's own reader
    (`wandb leet inspect --json`); a file cut by a kill reads up to the cut."""
    p = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_SILENT": "true"})
    if p.returncode != 0:
        raise runlog.TrainingError(f"cannot read the W&B run file {path}: {p.stderr.strip() or p.stdout.strip()}")
    rows = []
    for line in p.stdout.splitlines():
        rec = json.loads(line)
        if rec.get("type") == "history":
            rows.append(rec["history"]["item"])
    return rows


def offline_runs(outdir: str | Path, run_id: str) -> list[Path]:
    """OUTDIR's offline run dirs of W&B run ``run_id``, oldest first: the order `wandb sync` must upload them.
    W&B names them offline-run-<date>_<time>-<id>, with -1, -2... when a second one starts within the second."""
    name = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = [(m.group(1), int(m.group(2) or 0), p) for p in (Path(outdir) / "wandb").glob("offline-run-*")
             if (m := name.fullmatch(p.name))]
    return [p for *_, p in sorted(found)]


def _run_id(outdir: Path) -> str:
    path = outdir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids look like this: 8 lowercase letters and digits
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)  # a kill never leaves an empty id behind
    return run_id


class WandB:
    """A W&B run in OUTDIR/wandb, continued by every requeue. ``mode``: offline (never touches the network) or
    online; online that cannot reach the server warns in the run log and logs offline instead.
    ``resumed_at``: the checkpoint step a resumed run goes on from. ``config``: the resolved config (a dict),
    saved in the run's first record, so a killed offline run has it too (wandb/wandb#6952)."""

    def __init__(self, outdir: str | Path, mode: str, project: str, resumed_at: int | None, config: dict,
                 log: runlog.RunLog):
        try:
            import wandb
        except ImportError as e:
            raise runlog.TrainingError(f"train.wandb={mode} needs the wandb package ({e}); pip install 'wandb>=0.31' "
                                       "(or pip install -e '.[wandb]'), or set train.wandb=off") from None
        self.outdir = Path(outdir)
        self.run_id = _run_id(self.outdir)
        earlier = offline_runs(self.outdir, self.run_id)
        settings = dict(console="off", x_disable_stats=True, x_transaction_log_flush_interval=FLUSH_S, silent=True)
        if mode == "online" and "WANDB_INIT_TIMEOUT" not in os.environ:
            settings["init_timeout"] = INIT_TIMEOUT_S
        init = dict(project=project, id=self.run_id, resume="allow", dir=str(self.outdir), config=config)
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **init)
        except Exception as e:  # no network, no API key, the server refused: the run must go on
            if mode != "online":
                raise
            log.warn(f"train.wandb=online could not start a W&B run ({type(e).__name__}: {e}); logging offline "
                f"to {self.outdir / 'wandb'} instead: upload it from a login node with `wandb sync "
                f"{self.outdir / 'wandb'}/offline-run-*`")
            settings.pop("init_timeout", None)
            wandb.teardown()  # the failed run still holds its id in W&B's service
            self.run = wandb.init(mode="offline", settings=wandb.Settings(**settings), **init)
        # the last step W&B already holds: from the earlier offline files, or what the server says online
        self.held = -1
        for d in earlier:
            self.held = max([self.held] + [int(r["_step"]) for r in wandb_history(d) if "_step" in r])
        if not self.run.offline and self.run.resumed:
            self.held = max(self.held, self.run.starting_step - 1)
        if resumed_at is not None:  # steps an earlier process logged but W&B's file never got
            self._catch_up(resumed_at)
        where = (f"offline in {self.run.dir.rsplit('/files', 1)[0]}; upload from a login node with "
                 f"`wandb sync {self.outdir / 'wandb'}/offline-run-*`") if self.run.offline else self.run.url
        log.line(f"W&B run {self.run_id} ({project}): {where}")

    def _catch_up(self, resumed_at: int) -> None:
        """Send what metrics.jsonl and samples/ hold of steps (held, resumed_at], in step order."""
        backlog: dict[int, dict] = {}
        for rec in runlog.read_records(self.outdir):
            step = rec.get("step")
            if isinstance(step, int) and self.held < step <= resumed_at:
                backlog.setdefault(step, {})[rec.get("event")] = rec  # the last record of each step and kind
        grids = {}
        for path in (self.outdir / "samples").glob("preview_step*.png"):
            step = int(path.stem.removeprefix("preview_step")) if path.stem[12:].isdigit() else -1
            if self.held < step <= resumed_at and path == runlog.preview_path(self.outdir, step):
                grids[step] = path
        for step in sorted(set(backlog) | set(grids)):
            for rec in backlog.get(step, {}).values():
                self.record(rec)
            if step in grids:
                self.image("preview", grids[step], step)

    def record(self, rec: dict) -> None:
        step = rec.get("step")
        if not isinstance(step, int) or step <= self.held:
            return
        values = scalars(rec)
        if values:
            self.run.log(values, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        if step > self.held:
            import wandb

            self.run.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()
