"""The training docs name code that exists: every `path.py` they cite lies in the package (or the repository), and
every "`NAME` in `path.py`" is defined there (docs/reliability.md sent readers to training/config.py after the
module moved to training/settings/config.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = ("docs/training.md", "docs/reliability.md")
_PATH = re.compile(r"`([\w./-]+/[\w.-]+\.py)`")
_NAME_IN_PATH = re.compile(r"`([A-Z_][A-Z0-9_]*)` in `([\w./-]+\.py)`")


def _file(cited: str) -> Path | None:
    """The file a cited path means: relative to the package or to the repository root."""
    return next((p for p in (REPO / "moslora_diffusion" / cited, REPO / cited) if p.is_file()), None)


@pytest.mark.parametrize("page", PAGES)
def test_every_cited_source_file_exists(page):
    text = (REPO / page).read_text(encoding="utf-8")
    cited = _PATH.findall(text)
    assert cited, f"{page} cites no source file: the pattern no longer matches"
    assert [path for path in cited if _file(path) is None] == []


@pytest.mark.parametrize("page", PAGES)
def test_every_name_cited_in_a_file_is_defined_there(page):
    for name, path in _NAME_IN_PATH.findall((REPO / page).read_text(encoding="utf-8")):
        source = _file(path)
        assert source is not None and re.search(rf"^{name}\b.*=", source.read_text(encoding="utf-8"), re.M), (
            f"{page}: `{name}` in `{path}`")
