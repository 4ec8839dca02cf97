"""The layout's rules (ARCHITECTURE.md), checked: who may import whom, torch-free job tools, module sizes."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from runs import REPO

MAX_LINES = 450  # one concern per module: past this a file holds several


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = {n.name for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names}
    out |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and
            not node.level}
    return out


def _modules(part: str) -> list[Path]:
    return sorted(p for p in (REPO / part).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_core_knows_nothing_of_jobs_tools_or_bench():
    for path in _modules("t2v"):
        bad = {m for m in _imports(path) if m.split(".")[0] in ("jobs", "tools", "bench")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_jobs_use_only_the_torch_free_core_and_never_load_torch():
    allowed = {"t2v", "t2v.config", "t2v.runlog", "t2v.files", "t2v.table"}
    for path in _modules("jobs"):
        core = {m for m in _imports(path) if m.split(".")[0] == "t2v"}
        assert core <= allowed, f"{path.relative_to(REPO)} imports {sorted(core - allowed)}"
    code = ("import sys; import jobs.submit, jobs.status, jobs.render, jobs.policy, jobs.submitit_launch; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # the host side of a cluster (login node, batch shell) may have no torch


def test_no_module_holds_several_concerns():
    long = {str(p.relative_to(REPO)): n for part in ("t2v", "jobs", "tools", "bench") for p in _modules(part)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_requeue_exit_is_defined_once():
    hits = [str(p.relative_to(REPO)) for part in ("t2v", "jobs", "tools", "bench") for p in _modules(part)
            if "REQUEUE_EXIT = " in p.read_text()]
    assert hits == ["t2v/runlog.py"]


def test_bench_measures_the_core_and_imports_no_jobs_or_tools():
    for path in _modules("bench"):
        bad = {m for m in _imports(path) if m.split(".")[0] in ("jobs", "tools")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_no_script_edits_sys_path():
    """`make install` puts t2v, jobs, tools and bench on the path (an editable install); scripts never patch it."""
    hits = [str(p.relative_to(REPO)) for part in ("t2v", "jobs", "tools", "bench") for p in _modules(part)
            if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()]
    assert not hits, hits


def _import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, `from pkg import module` included, and imports under
    `if TYPE_CHECKING:` too: a circle for the type checker is a circle for the reader."""
    names = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for part in ("t2v", "jobs", "tools", "bench") for p in _modules(part)}
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for m in targets:
                while m and m not in names:
                    m = m.rpartition(".")[0]
                if m and m != name and not name.startswith(m + "."):  # not the package a module is in
                    found.add(m)
        graph[name] = found
    return graph


def test_the_imports_form_no_circle():
    graph, state, circles = _import_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, f"import circles: {circles}"


def test_the_space_is_asked_not_named():
    """What differs between pixel and latent space is answered by t2v/space.py (or, torch-free, by
    t2v.config_checks.SPACES): no other module compares model.space with a name."""
    import re

    named = re.compile(r"""space\s*(==|!=)|space\s+(not\s+)?in\s+\(|["'](pixel|latent)["']\s*(==|!=|in\b)""")
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for part in ("t2v", "jobs", "tools")
            for p in _modules(part) if p.name != "space.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if named.search(line)]
    assert not hits, hits
