"""The checkout after a user ran the README's examples in it: their outputs are no files of the project (git ignores
them) and the linter of scripts/test.sh checks the project's own files only, not a user's scratch script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the README's tiny example and evaluation commands write into the checkout.
SCRATCH = ["tiny", "tiny-sd15", "photos", "tiny-run", "out", "eval", "samples"]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("folder", SCRATCH)
def test_the_readme_examples_outputs_are_ignored_by_git(folder):
    probe = subprocess.run(["git", "check-ignore", "-q", f"{folder}/model_index.json"], cwd=REPO)
    assert probe.returncode == 0, f"{folder}/ is not ignored"
    tracked = subprocess.run(["git", "check-ignore", "-q", "moslora_diffusion/x.py"], cwd=REPO)
    assert tracked.returncode == 1  # the package itself is not


def test_lint_checks_the_projects_files_and_not_a_users_scratch_script(tmp_path):
    """pyproject.toml's ruff settings in a copy of the layout: an unused import in a scratch script at the top or
    in a README output folder is not reported, the same in the package is."""
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed (pip install -e .[test])")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for path in ("scratch.py", "tiny-run/notes.py", "moslora_diffusion/bad.py", "tests/test_ok.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("import os\n" if path != "tests/test_ok.py" else "X = 1\n")
    result = subprocess.run([str(ruff), "check", "--no-cache", "--output-format", "concise", "."], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    reported = {line.split(":")[0] for line in result.stdout.splitlines() if ":" in line and "F401" in line}
    assert reported == {str(Path("moslora_diffusion/bad.py"))}, result.stdout
