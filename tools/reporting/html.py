"""The run page: report/index.html for one run, compare.html for several. One self-contained file each: every
image is inlined as a data URI and the style is in the page, so it opens from the file system (no server, no CDN,
nothing fetched), and can be copied off the cluster as one file.

The page shows what summary.md says (the same Markdown, built from the same Run by tools/reporting/markdown.py,
rendered by the `markdown` package), then every preview grid in step order and the run's GIFs. The compare page
shows compare.md (curves overlaid, headline numbers) and the settings in which the runs' configs differ.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Sequence

import markdown

from t2v.config import flatten
from t2v.files import write_text
from tools.reporting.inventory import SAMPLE_RE
from tools.reporting.run import Run

MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; }
th { background: #f4f4f4; }
img { max-width: 100%; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figcaption { font-size: 13px; color: #555; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def data_uri(path: Path) -> str:
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _inline(body: str, base: Path, notes: list[str]) -> str:
    """Every <img src="relative/path"> of rendered Markdown, as a data URI (a missing file is noted)."""
    def swap(m: re.Match) -> str:
        src = html.unescape(m.group(2))
        if src.startswith("data:"):
            return m.group(0)
        path = (base / src).resolve()
        if not path.is_file():
            notes.append(f"image not found: {src}")
            return m.group(0)
        return f'{m.group(1)}"{data_uri(path)}"'
    return re.sub(r'(<img [^>]*src=)"([^"]+)"', swap, body)


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def _figure(path: Path, caption: str) -> str:
    return (f'<figure><img src="{data_uri(path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _previews(run: Run) -> str:
    parts = ["<h2>Previews</h2>"]
    if run.samples:
        parts += [_figure(p, f"step {int(SAMPLE_RE.match(p.name).group('step'))}: {p.name}") for p in run.samples]
    else:
        parts.append("<p>No preview grids (train.sample_every = 0, or none written yet).</p>")
    gifs = sorted((run.path / "samples").rglob("*.gif")) if (run.path / "samples").is_dir() else []
    if gifs:
        parts.append("<h2>Videos</h2>")
        parts += [_figure(p, p.relative_to(run.path / "samples").as_posix()) for p in gifs]
    return "\n".join(parts)


def render(md_text: str) -> str:
    return markdown.markdown(md_text, extensions=["tables"], output_format="html")


def write_run_page(run: Run, out_dir: Path, summary: Path) -> Path:
    """out_dir/index.html from the run's summary.md (its figures are relative to out_dir) and its previews."""
    notes: list[str] = []
    body = _inline(render(summary.read_text(encoding="utf-8")), out_dir, notes) + "\n" + _previews(run)
    if notes:
        body += "\n<h2>Page notes</h2>\n<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
    return write_text(out_dir / "index.html", _page(f"t2v run {run.name}", body))


def config_differences(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each config key whose value differs between the runs (or that some run lacks)."""
    flat = [flatten(r.config or {}) for r in runs]
    keys = sorted({k for f in flat for k in f})
    rows = [[k, *("(not set)" if k not in f else str(f[k]) for f in flat)]
            for k in keys if len({repr(f.get(k, "\0missing")) for f in flat}) > 1]
    return ["setting", *(r.name for r in runs)], rows


def write_compare_page(runs: Sequence[Run], out_dir: Path, compare_md: Path) -> Path:
    """out_dir/compare.html: compare.md (the overlay and headline numbers) and the configs' differences."""
    notes: list[str] = []
    body = _inline(render(compare_md.read_text(encoding="utf-8")), out_dir, notes)
    header, rows = config_differences(runs)
    body += "\n<h2>Settings that differ</h2>\n"
    if rows:
        body += ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>"
                 + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                 + "</tbody></table>")
    else:
        body += "<p>None: the runs' configs are the same (or no run has a config.yaml).</p>"
    links = "".join(f"<li>{html.escape(r.name)}: <a href=\"{html.escape((r.path / 'report' / 'index.html').as_uri())}\">"
                    "its run page</a></li>" for r in runs)
    body += f"\n<h2>Run pages</h2>\n<ul>{links}</ul>"
    if notes:
        body += "\n<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
    return write_text(out_dir / "compare.html", _page("t2v runs compared", body))
