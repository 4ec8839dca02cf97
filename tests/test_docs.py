"""The docs hold together: README.md and docs/*.md link only to files and headings that exist, name only `make`
targets the Makefile defines, and README.md stays short (a newcomer reads it in five minutes).

Pure Python on the Markdown text: no network, no subprocess, no Markdown library.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" may follow) or ")"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
MAKE = re.compile(r"(?:^|[\s;&|(`])make\s+([^\s`;&|)]+)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code-block lines): fenced blocks apart from the rest."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation dropped except '-' and '_',
    each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"(\*\*|__|(?<!\w)[*_]|[*_](?!\w))", "", text)  # emphasis markers, not snake_case
    out = []
    for ch in text.strip().lower():
        if ch in "-_ " or ch.isalnum() or unicodedata.category(ch).startswith("M"):
            out.append("-" if ch == " " else ch)
    return "".join(out)


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link outside code blocks and code spans."""
    out, fenced = [], False
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            out.append((no, m.group(1)))
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for no, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{no}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    return problems


def make_targets() -> set[str]:
    """Targets the Makefile defines: rule lines `name [name ...]: ...` (not `:=` assignments) and .PHONY."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    targets = set()
    for line in text.splitlines():
        if line.startswith(("\t", "#")) or not line.strip():
            continue
        m = re.match(r"^([^:=#\t]+?)\s*::?(?!=)(.*)$", line)
        if not m:
            continue
        names, rest = m.group(1).split(), m.group(2)
        if names == [".PHONY"]:
            targets.update(rest.split())
        else:
            targets.update(n for n in names if not n.startswith((".", "$")))
    return targets


def named_make_targets(path: Path) -> list[tuple[str, str]]:
    """(where, target) for every `make TARGET` in a code block or a code span of the file."""
    text = path.read_text(encoding="utf-8")
    _, code = split_code(text)
    snippets = [line.split(" #")[0] for line in code]  # not the comments in a code block
    prose, _ = split_code(text)
    snippets += [m.group(2) for line in prose for m in CODE_SPAN.finditer(line)]
    out = []
    for snippet in snippets:
        for m in MAKE.finditer(snippet):
            word = m.group(1)
            if "=" in word or word.startswith("-") or not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", word):
                continue  # a variable (make STEPS=5) or an option, or a placeholder (make ...)
            out.append((f"{path.relative_to(ROOT)}: `{snippet.strip()}`", word))
    return out


def test_every_relative_link_resolves():
    problems = [p for path in doc_files() for p in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_make_target_named_exists():
    defined = make_targets()
    assert {"demo", "test", "submit", "status", "logs", "cancel"} <= defined, sorted(defined)
    named = [(where, t) for path in doc_files() for where, t in named_make_targets(path)]
    missing = [f"{where}: make {t}" for where, t in named if t not in defined]
    assert not missing, "make targets the Makefile does not define:\n" + "\n".join(missing)
    # the scan sees targets in code blocks (make submit STEPS=5000) and in code spans (`make cache-submit ...`)
    assert {"submit", "cache-submit"} <= {t for _, t in named}, sorted({t for _, t in named})


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES} (move detail to docs/)"


def test_readme_keeps_the_two_setup_commands_and_links_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(ROOT / "README.md") if not EXTERNAL.match(t)}
    pages = set((ROOT / "docs").glob("*.md")) - {ROOT / "docs" / "README.md"}
    unlinked = sorted(p.relative_to(ROOT).as_posix() for p in pages if p.resolve() not in linked)
    assert not unlinked, "docs pages the README does not link: " + ", ".join(unlinked)


def test_slug_follows_github():
    assert slug("Latent space: a pretrained VAE at 256×256") == "latent-space-a-pretrained-vae-at-256256"
    assert slug("The run contract (`t2v/runlog.py`)") == "the-run-contract-t2vrunlogpy"
    assert slug("Where the caption matters: `demo_probe`") == "where-the-caption-matters-demo_probe"
    assert slug("VAE '...' is not available offline") == "vae--is-not-available-offline"
    assert slug("**Bold** and _it_") == "bold-and-it"
