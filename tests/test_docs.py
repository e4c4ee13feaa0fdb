"""The documentation: the Sphinx site builds with warnings as errors, every ```python block of
every page and of the README runs, the README stays an entry page (<= 200 lines) whose links and
commands are true.

A page's Python blocks run in order in one namespace (the ``__main__`` of a fresh interpreter,
so that classes and functions a block defines are referenceable by a checkpoint as a script's
are), in an empty temporary directory, in a subprocess with the checkout on ``PYTHONPATH``. A
block that cannot run must be marked by a ``<!-- not-executed: reason -->`` comment on the line
before its fence; the suite lists them (there are none today).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
#: every Markdown page of the site, and the README
PAGES = [*sorted(DOCS.rglob("*.md")), README]
#: Python blocks marked as not executed, with their reasons: keep this (near) empty
EXPECTED_NOT_EXECUTED: dict[str, list[str]] = {}
README_MAX_LINES = 200
PAGE_TIMEOUT_S = 600
BUILD_TIMEOUT_S = 600

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
_NOT_EXECUTED = re.compile(r"^\s*<!--\s*not-executed:\s*(?P<reason>.+?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    language: str
    line: int  # 1-based line of the first line of code (after the opening fence)
    source: str  # dedented by the fence's indentation
    not_executed: str | None  # the reason of a ``<!-- not-executed: ... -->`` mark, if any


def code_blocks(text: str, where: str = "<page>") -> list[Block]:
    """The fenced code blocks of a Markdown text, in order (nested fences of a longer outer
    fence stay inside it). An unclosed fence is a ``ValueError`` naming the line."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        language = opening["info"].strip().split(" ")[0].strip("{}")
        mark = _NOT_EXECUTED.match(lines[i - 1]) if i > 0 else None
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (closing is not None and closing["fence"][0] == fence[0]
                    and len(closing["fence"]) >= len(fence) and not closing["info"].strip()):
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        else:
            raise ValueError(f"{where}:{i + 1}: the fence {fence!r} is never closed")
        blocks.append(Block(language, i + 2, textwrap.dedent("\n".join(body)) + "\n",
                            mark["reason"] if mark else None))
        i = j + 1
    return blocks


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def python_blocks(page: Path) -> list[Block]:
    return [b for b in code_blocks(page.read_text(encoding="utf-8"), page_id(page))
            if b.language in ("python", "py", "python3")]


#: runs the blocks given as JSON ([path, line, source], ...) in this interpreter's __main__;
#: each is compiled at its own line of its page, so a traceback names the page and the line
RUNNER = """
import json, sys
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
for path, line, source in blocks:
    print(f"--- {path}:{line}", flush=True)
    exec(compile("\\n" * (line - 1) + source, path, "exec"), globals())
"""


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "plugins" / "nnhandler-sde" / "src")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env["MPLBACKEND"] = "Agg"
    return env


def run_blocks(page: Path, blocks: list[Block], cwd: Path) -> subprocess.CompletedProcess[str]:
    (cwd / ".blocks.json").write_text(json.dumps(
        [[page_id(page), b.line, b.source] for b in blocks]), encoding="utf-8")
    return subprocess.run([sys.executable, "-c", RUNNER, ".blocks.json"], cwd=cwd,
                          env=child_environment(), capture_output=True, text=True,
                          timeout=PAGE_TIMEOUT_S)


# ------------------------------------------------------------------------------------------
# the block extractor itself
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("a\n```python\nx = 1\n```\n", [("python", 3, "x = 1\n", None)]),
    ("1. step\n\n   ```python\n   def f():\n       return 1\n   ```\n",
     [("python", 4, "def f():\n    return 1\n", None)]),
    ("<!-- not-executed: needs a GPU -->\n```python\ncuda()\n```\n",
     [("python", 3, "cuda()\n", "needs a GPU")]),
    ("````markdown\n```python\nx\n```\n````\n", [("markdown", 2, "```python\nx\n```\n", None)]),
    ("```{toctree}\n:maxdepth: 2\n\npage\n```\n", [("toctree", 2, ":maxdepth: 2\n\npage\n", None)]),
    ("```bash\nls\n```\ntext\n```text\nout\n```\n",
     [("bash", 2, "ls\n", None), ("text", 6, "out\n", None)]),
], ids=["plain", "indented-in-a-list", "not-executed-mark", "nested-fence", "directive",
        "two-blocks"])
def test_code_blocks_are_found_with_their_language_line_and_source(
        text: str, expected: list[tuple[str, int, str, str | None]]) -> None:
    assert [(b.language, b.line, b.source, b.not_executed) for b in code_blocks(text)] \
        == expected


def test_an_unclosed_fence_is_an_error_naming_the_line() -> None:
    with pytest.raises(ValueError, match=r"page.md:2: the fence '```' is never closed"):
        code_blocks("text\n```python\nx = 1\n", "page.md")


def test_a_failing_block_reports_its_page_and_line(tmp_path: Path) -> None:
    """What a broken snippet looks like to the suite: the traceback names page and line."""
    page = DOCS / "getting-started.md"
    completed = run_blocks(page, [Block("python", 7, "x = 1\nraise RuntimeError(x)\n", None)],
                           tmp_path)
    assert completed.returncode == 1
    assert 'File "docs/getting-started.md", line 8' in completed.stderr
    assert "RuntimeError: 1" in completed.stderr


# ------------------------------------------------------------------------------------------
# every page's Python blocks run
# ------------------------------------------------------------------------------------------
EXECUTED_PAGES = [page for page in PAGES
                  if any(b.not_executed is None for b in python_blocks(page))]


@pytest.mark.slow
@pytest.mark.parametrize("page", EXECUTED_PAGES, ids=[page_id(p) for p in EXECUTED_PAGES])
def test_python_blocks_of_the_page_run(page: Path, tmp_path: Path) -> None:
    blocks = [b for b in python_blocks(page) if b.not_executed is None]
    completed = run_blocks(page, blocks, tmp_path)
    assert completed.returncode == 0, (
        f"{page_id(page)}: a Python block failed\n{completed.stdout[-4000:]}\n"
        f"{completed.stderr[-8000:]}")
    assert completed.stdout.count("--- ") >= len(blocks)


def test_python_blocks_not_executed_are_listed_with_a_reason() -> None:
    found = {page_id(page): [b.not_executed for b in python_blocks(page)
                             if b.not_executed is not None] for page in PAGES}
    assert {k: v for k, v in found.items() if v} == EXPECTED_NOT_EXECUTED


def test_guides_have_python_blocks_to_run() -> None:
    """The executed pages are the guides with code: a page whose blocks all lost their
    ``python`` language (or moved) would silently stop being tested."""
    names = {page_id(p) for p in EXECUTED_PAGES}
    assert {"README.md", "docs/getting-started.md", "docs/autosave.md", "docs/retention.md",
            "docs/plugins.md", "docs/resuming.md", "docs/writing-a-saver.md"} <= names


# ------------------------------------------------------------------------------------------
# the README
# ------------------------------------------------------------------------------------------
def test_readme_is_an_entry_page_of_at_most_200_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_links_into_the_docs_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)(?:#[^)]*)?\)", text)
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert missing == []


def test_readme_test_command_is_the_one_ci_runs() -> None:
    """The README's second set-up command is the one ``.ci/run`` runs (quietly)."""
    readme = README.read_text(encoding="utf-8")
    command = 'pip install -e ".[dev]" -e plugins/nnhandler-sde && python -m pytest'
    assert command in readme
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert command.replace("pip install", "python -m pip install --quiet") in ci
    assert "pip install -e . && python examples/quickstart.py" in readme


# ------------------------------------------------------------------------------------------
# the site
# ------------------------------------------------------------------------------------------
def _missing_docs_tools() -> str | None:
    for module in ("sphinx", "myst_parser", "furo"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[docs]')"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_missing_docs_tools() is not None, reason=str(_missing_docs_tools()))
def test_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    """``nox -s docs``'s build: nitpicky, every warning an error, into a fresh folder."""
    out = tmp_path / "html"
    completed = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        cwd=ROOT, env=child_environment(), capture_output=True, text=True,
        timeout=BUILD_TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for page in sorted(DOCS.rglob("*.md")):
        assert (out / page.relative_to(DOCS).with_suffix(".html")).is_file(), page
    assert "NNHandler.load" in (out / "api" / "handler.html").read_text(encoding="utf-8")
