"""Progress for long loops (cache builds, caption embedding, sampling, evaluation): a tqdm bar on a terminal,
plain periodic log lines everywhere else.

A Slurm log is a file: tqdm's `\\r`-redrawn bar lands there as one huge line (or hundreds of fragments) that
`tail -f` and grep cannot read. Off a terminal the same tqdm counts are written as one whole line every
LINE_EVERY_S seconds, plus the first and the last.
"""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm import tqdm

LINE_EVERY_S = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) | {elapsed} elapsed, {remaining} left, {rate_fmt}"


class LineProgress(tqdm):
    """tqdm that writes a whole line per refresh instead of redrawing one with `\\r`."""

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing its bar on close: there is nothing to clear
            return False
        self.fp.write((msg or self.format_meter(**self.format_dict)) + "\n")
        self.fp.flush()
        return True

    def close(self):
        if not self.disable and getattr(self, "last_print_n", None) != self.n:
            self.display()  # the final count, unless that exact line was the last one written
        self.leave = False  # so tqdm neither redraws nor appends a newline
        super().close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, file=None) -> tqdm:
    """A progress counter over ``iterable`` (or updated by hand with ``.update(n)``), written to ``file``
    (default stderr): a bar if it is a terminal, else plain lines. ``enabled=False`` writes nothing."""
    file = file or sys.stderr
    if hasattr(file, "isatty") and file.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=file)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=file,
                        mininterval=LINE_EVERY_S, bar_format=LINE_FORMAT)
