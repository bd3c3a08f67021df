"""scripts/demo.sh and scripts/demo_mole.sh never delete a user's file: each run's samples go to a new folder
($OUT/samples, else samples-2, ...), which the toy check then reads alone, and class images stay under OUT.

The scripts run for real (bash), in a copy of the repository whose set-up and `python` are stand-ins that record
each command and write one image where a generate command would: seconds, no model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The stand-in for .venv/bin/python: records its arguments (and, for the toy check, what the folder holds).
FAKE_PYTHON = """#!{python}
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
record = {{"args": args}}
value = lambda flag: args[args.index(flag) + 1] if flag in args else None
if value("--output_dir"):
    Path(value("--output_dir")).mkdir(parents=True, exist_ok=True)
if "generate" in args or "moslora_diffusion.generate" in args:
    image = Path(value("--out")) / "2030-01-01" / "new.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"drawn by this run")
if "moslora_diffusion.toy.subject_check" in args:
    folder = Path(args[-1])
    record["checked"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
with open(os.environ["DEMO_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
"""


@pytest.fixture
def repo(tmp_path):
    """A copy of the scripts with a stand-in set-up and python (the toy base model's branch of demo.sh)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("demo.sh", "demo_mole.sh", "new_folder.sh"):
        shutil.copy(REPO / "scripts" / name, root / "scripts" / name)
    (root / "scripts" / "setup.sh").write_text("exit 0\n")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    (bin_dir / "python").write_text(FAKE_PYTHON.format(python=sys.executable))
    (bin_dir / "python").chmod(0o755)
    (root / "assets" / "toy-base").mkdir(parents=True)
    (root / "assets" / "toy-base" / "model_index.json").write_text("{}")
    return root


def _run(repo: Path, script: str, out: Path | None) -> tuple[list[dict], str]:
    log = repo / "log.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "DEMO_LOG": str(log), "STEPS": "2"}
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    done = subprocess.run(["bash", str(repo / "scripts" / script)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()], done.stdout


def _value(calls: list[dict], command: str, flag: str) -> list[str]:
    return [c["args"][c["args"].index(flag) + 1] for c in calls if command in c["args"] and flag in c["args"]]


def _checked(calls: list[dict]) -> tuple[str, list[str]]:
    (check,) = [c for c in calls if "checked" in c]
    return check["args"][-1], check["checked"]


def _users_samples(tmp_path: Path) -> Path:
    """An OUT folder whose samples/ holds the user's own best.png."""
    out = tmp_path / "mine"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "best.png").write_bytes(b"the user's favourite")
    return out


def test_demo_keeps_a_users_samples_and_checks_only_its_own(repo, tmp_path):
    """`OUT=folder bash scripts/demo.sh` ran `rm -rf "$OUT/samples"`: the user's $OUT/samples/best.png was deleted."""
    out = _users_samples(tmp_path)
    calls, stdout = _run(repo, "demo.sh", out)
    assert (out / "samples" / "best.png").read_bytes() == b"the user's favourite"
    assert sorted(p.name for p in (out / "samples").rglob("*")) == ["best.png"]  # nothing mixed in either
    assert _value(calls, "moslora_diffusion.generate", "--out") == [str(out / "samples-2")]
    assert _checked(calls) == (str(out / "samples-2"), ["2030-01-01/new.png"])
    assert f"in {out / 'samples-2'}" in stdout
    calls, _ = _run(repo, "demo.sh", out)  # again: a third folder, the earlier run's samples kept
    assert _checked(calls) == (str(out / "samples-3"), ["2030-01-01/new.png"])
    assert (out / "samples-2" / "2030-01-01" / "new.png").is_file()


def test_the_readmes_demo_command_still_writes_outputs_demo_samples(repo):
    """`bash scripts/demo.sh` as the README gives it: a first run's samples in outputs/demo/samples."""
    calls, stdout = _run(repo, "demo.sh", None)
    assert _value(calls, "train_dreambooth.py", "--output_dir") == ["outputs/demo"]
    assert _checked(calls) == ("outputs/demo/samples", ["2030-01-01/new.png"])
    assert "in outputs/demo/samples" in stdout


def test_demo_mole_keeps_a_users_samples_and_its_class_images_stay_under_out(repo, tmp_path):
    """demo_mole.sh had the same `rm -rf`, and wrote class images to outputs/demo-mole-class-* whatever OUT was."""
    out = _users_samples(tmp_path)
    calls, _ = _run(repo, "demo_mole.sh", out)
    assert (out / "samples" / "best.png").read_bytes() == b"the user's favourite"
    assert _value(calls, "train_dreambooth.py", "--class_data_dir") == [
        str(out / f"class-{name}") for name in ("sks-star", "v-square", "z-background")]
    assert _value(calls, "generate", "--out") == [str(out / "samples-2")]
    assert _checked(calls) == (str(out / "samples-2"), ["2030-01-01/new.png"])
    assert not (repo / "outputs").exists()  # nothing written outside OUT
