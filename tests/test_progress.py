"""Progress off a terminal (a Slurm log) is whole lines, never `\r` redraws; on a terminal it is a tqdm bar."""
from __future__ import annotations

import io

import tqdm

from t2v import progress as P


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_progress_is_plain_periodic_lines(monkeypatch):
    monkeypatch.setattr(P, "LINE_EVERY_S", 0.0)  # a line at every update, to see each one
    log = io.StringIO()
    bar = P.progress(total=10, desc="embedding captions", unit="caption", file=log)
    bar.mininterval = bar.miniters = 0
    for _ in range(5):
        bar.update(2)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("embedding captions: 0/10 caption (0%)")
    assert lines[-1].startswith("embedding captions: 10/10 caption (100%)")
    assert len(lines) == len(set(lines)) >= 3  # each count once: close repeats no line


def test_lines_are_periodic_not_per_item():
    log = io.StringIO()
    for _ in P.progress(range(1000), desc="caching clips", unit="clip", file=log):
        pass
    assert log.getvalue().splitlines()[-1].startswith("caching clips: 1000/1000 clip")
    assert len(log.getvalue().splitlines()) == 2  # the first and the last within LINE_EVERY_S


def test_a_terminal_gets_a_bar_and_disabled_writes_nothing():
    assert type(P.progress(total=3, file=Terminal())) is tqdm.tqdm
    quiet = io.StringIO()
    for _ in P.progress(range(3), file=quiet, enabled=False):
        pass
    assert quiet.getvalue() == ""


def test_caption_embedding_in_a_batch_log_writes_lines(tmp_path, capsys):
    from t2v.config import TextConfig
    from t2v.text import embed_captions

    embed_captions(TextConfig(encoder="hash", dim=16), [f"caption {i}" for i in range(40)], tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "embedding captions: 40/40 caption (100%)" in err
