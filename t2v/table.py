"""Tables for people: one Markdown renderer and one aligned plain-text renderer for the whole project.

tools/report.py (summary.md, checkpoints.md, compare.md), bench/run.py (latest.md and its stdout table),
bench/demo_recipes.py, jobs/status.py and `python -m t2v.data check` all print tables. They share these two
functions so that escaping and alignment are decided once. The module imports nothing, so every layer (the
core, jobs on a login node, tools without torch) may use it. Cells are formatted by the caller: a table does
not know what a number means.
"""
from __future__ import annotations

from typing import Iterable, Sequence


def _md_cell(cell: object) -> str:
    # a bar would end the cell and a newline the row: both would break the table's columns
    return str(cell).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table, one line per row, without a trailing newline."""
    lines = ["| " + " | ".join(_md_cell(c) for c in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[object], rows: Iterable[Sequence[object]], sep: str = "  ", rule: bool = False,
               right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell and joined by ``sep``, for a terminal or a Slurm log.

    ``rule`` draws dashes under the header; where ``sep`` holds a bar, the rule crosses it as ``+``
    (``-----+------``). Columns whose index is in ``right`` are right-aligned (numbers). Lines carry no
    trailing blanks, so the last column may be as long as it likes (a path, a message)."""
    table = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = set(right)

    def line(cells: Sequence[str], gap: str = sep) -> str:
        return gap.join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(row).rstrip() for row in table]
    if rule:
        cross = sep.replace(" ", "-").replace("|", "+") if "|" in sep else sep
        out.insert(1, line(["-" * w for w in widths], cross))
    return "\n".join(out)
