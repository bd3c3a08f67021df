"""Docs that cannot rot: every Python block of README.md and docs/*.md runs (on tiny models) or, marked
```python no-run, has its imports and module attributes resolved; every command of a shell block parses with
the command's own argument parser; every relative link and #anchor leads somewhere. Each failure names its
file and line. The conventions for writing blocks: docs/reliability.md, "Docs that are tested"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from docs_commands import SHELL_LANGS, command_problems
from docs_markdown import fenced_blocks, link_problems
from docs_python import STAND_INS, build_fixtures, resolution_problems, run_block, workdir_for

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _label(path: Path) -> str:
    return str(path.relative_to(REPO))


BLOCKS = [block for page in PAGES for block in fenced_blocks(page, _label(page))]
PYTHON = [b for b in BLOCKS if b.lang in ("python", "py", "python3")]
SHELL = [b for b in BLOCKS if b.lang in SHELL_LANGS]


@pytest.fixture(scope="session")
def docs_fixtures(tmp_path_factory):
    runnable = " ".join(b.text for b in PYTHON if "no-run" not in b.options)
    needed = {stand_in for hub_id, stand_in in STAND_INS.items() if hub_id in runnable or stand_in in runnable}
    return build_fixtures(tmp_path_factory.mktemp("docs-fixtures"), REPO, needed)


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move detail into a docs/ page (at most 300)"


def test_every_kind_of_block_is_collected():
    """A parser that found nothing would pass every test below: the README alone has both kinds."""
    assert any(b.path.name == "README.md" for b in PYTHON) and any(b.path.name == "README.md" for b in SHELL)


@pytest.mark.parametrize("block", PYTHON, ids=[b.where() for b in PYTHON])
def test_python_block(block, docs_fixtures, tmp_path):
    problems = resolution_problems(block)
    assert not problems, "\n".join(problems)
    if "no-run" in block.options:
        return
    try:
        run_block(block, workdir_for(docs_fixtures, REPO, tmp_path / "work"))
    except Exception as err:
        pytest.fail(f"{block.where()}: the block raised {type(err).__name__}: {err} (the traceback's line numbers "
                    f"are {block.label}'s)")


@pytest.mark.parametrize("block", SHELL, ids=[b.where() for b in SHELL])
def test_shell_block(block):
    problems = command_problems(block, REPO)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=[_label(p) for p in PAGES])
def test_links_and_anchors(page):
    problems = link_problems(page, _label(page), REPO)
    assert not problems, "\n".join(problems)


def test_every_docs_page_the_code_names_exists():
    """`see docs/app.md` in app.py's docstring (and any other) must lead somewhere."""
    named = []
    for source in [*REPO.glob("*.py"), *REPO.glob("moslora_diffusion/**/*.py"), *REPO.glob("scripts/*.sh"),
                   *REPO.glob("benchmarks/*.py")]:
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            named += [(f"{source.relative_to(REPO)}:{number}", page) for page in re.findall(r"docs/[\w.-]+\.md", line)]
    assert named, "app.py and train_dreambooth.py name their docs pages: the search found none"
    missing = [f"{where}: {page} does not exist" for where, page in named
               if not (REPO / page).is_file()]
    assert not missing, "\n".join(missing)
