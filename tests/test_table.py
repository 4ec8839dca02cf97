"""t2v/table.py: the project's one Markdown table and one aligned text table."""
from __future__ import annotations

from t2v.table import markdown_table, text_table


def test_markdown_table_escapes_bars_and_newlines():
    md = markdown_table(["name", "a|b"], [["x | y", 1.5], ["two\nlines", None]])
    assert md.splitlines() == ["| name | a\\|b |", "|---|---|", "| x \\| y | 1.5 |", "| two lines | None |"]
    assert markdown_table(["h"], []) == "| h |\n|---|"


def test_text_table_alignment_rule_and_no_trailing_blanks():
    t = text_table(("JOB", "STATE", "RUN"), [("7", "PENDING", "/runs/a"), ("12345", "", "")])
    assert t.splitlines() == ["JOB    STATE    RUN", "7      PENDING  /runs/a", "12345"]
    t = text_table(("line", "kind", "message"), [(3, "json", "bad"), (120, "missing", "no video")], sep=" | ",
                   rule=True, right=[0])
    assert t.splitlines() == ["line | kind    | message", "-----+---------+---------", "   3 | json    | bad",
                              " 120 | missing | no video"]
    assert text_table(("a", "b"), [("xx", "y")], rule=True).splitlines()[1] == "--  -"
