"""The run's records, also where people already look: TensorBoard event files in OUTDIR/tensorboard.

A tracker is a sink of t2v.runlog.RunLog: it receives exactly the records metrics.jsonl receives (loss records,
events), plus the preview grids, so TensorBoard shows the same run the reports show, from the same stream.
Only rank 0 has a RunLog that writes, so only rank 0 writes event files.

Resumes: a requeued or killed run continues from its checkpoint at step N, and steps after N that the earlier
process had already logged are logged again. The writer of a resumed run is opened with ``purge_step=N + 1``:
TensorBoard then drops what the earlier files hold from step N + 1 on, so every step shows once, in order
(the `SessionLog.START` mechanism of TensorBoard's own readers). A run killed mid-write leaves a truncated last
record, which TensorBoard's readers skip; the next process writes a new file.
"""
from __future__ import annotations

from pathlib import Path

from t2v import runlog

# loss-record fields shown as scalars, under train/
SCALARS = ("loss", "lr", "grad_norm", "clips_per_s", "step_time")
MARKED = (runlog.START, runlog.RESUME, runlog.PREEMPT, runlog.DONE, runlog.PREVIEW_FAILED)


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
        self.writer = SummaryWriter(str(self.logdir), purge_step=None if resumed_at is None else resumed_at + 1,
                                    flush_secs=30)
        if config:  # indented: TensorBoard renders text as Markdown, and this keeps it a code block
            self.writer.add_text("config", "\n".join("    " + line for line in config.splitlines()), resumed_at or 0)

    def record(self, rec: dict) -> None:
        step = rec.get("step")
        if not isinstance(step, int):
            return
        name = rec.get("event")
        if name is None:
            for key in SCALARS:
                if isinstance(rec.get(key), (int, float)):
                    self.writer.add_scalar(f"train/{key}", rec[key], step)
            self.writer.flush()  # a kill -9 loses at most what came after the last loss record
        elif name == runlog.VAL:
            for key, value in rec.items():
                if key.startswith("val_loss") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"val/{key}", value, step)
            self.writer.flush()
        elif name in MARKED:
            # restart markers: a scalar that steps up at every (re)start, and the event in words
            if name in (runlog.START, runlog.RESUME):
                self.writer.add_scalar("run/restart", rec.get("restart", 0), step)
            detail = ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("event", "step", "time"))
            self.writer.add_text("run/events", f"{name} at step {step}" + (f" ({detail})" if detail else ""), step)
            self.writer.flush()

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
