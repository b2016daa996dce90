"""The documentation points only at things that exist, and the README stays short.

Every Markdown link (relative, not a URL or an in-page anchor) in README.md and docs/*.md must
resolve from the file that holds it, and every results path named in backticks
(`benchmarks/results/...`, globs allowed) must match at least one file in the repository:
a number in the docs always points at the file that holds it.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + [
    ROOT / "benchmarks" / "results" / "eval" / "COMMANDS.md"]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_RESULT_PATH = re.compile(r"`((?:benchmarks/results|docs)/[^`\s<>]+)`")


def _links(text: str):
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+://", target) or target.startswith(("#", "mailto:")):
            continue
        yield target.split("#", 1)[0]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    missing = [t for t in _links(text) if t and not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_results_exist(doc):
    text = doc.read_text(encoding="utf-8")
    missing = []
    for path in _RESULT_PATH.findall(text):
        path = path.rstrip(".,;:)")
        pattern = path if any(c in path for c in "*?[") else path.rstrip("/")
        if not glob.glob(str(ROOT / pattern)) and not glob.glob(str(ROOT / pattern) + "*"):
            missing.append(path)
    assert not missing, f"{doc.relative_to(ROOT)} names results that do not exist: {missing}"


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= 12 * 1024, f"README.md is {size} bytes; keep it under 12 KB (details go to docs/)"


def test_demo_time_is_one_figure():
    """README and `rora-fast demo --help` state the same measured demo time."""
    from rora_harness.cli import DEMO_DESCRIPTION, __doc__ as cli_doc

    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    times = set(re.findall(r"about (\d+) min", readme + " " + DEMO_DESCRIPTION + " " + cli_doc))
    assert len(times) == 1, times
