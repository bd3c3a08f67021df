"""The allocator settings (console/allocator.py): applied by every command and the test suite, effective (a
64 MiB block comes from the heap, not its own mapping), a no-op without glibc, and no change to results."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from moslora_diffusion.console import allocator
from tests.training_helpers import REPO, adapter_weights, cli_args, cli_env, make_photos, tiny_config

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")

# Runs an entry point (argv[1:], its --help) in this fresh process, then reports whether a 64 MiB malloc lands
# inside the brk heap ([heap] in /proc/self/maps): with glibc's defaults a block that large is mmap()ed on its
# own (the dynamic mmap threshold stops at 32 MiB), with the settings applied it comes from the heap.
PROBE = r"""
import ctypes, runpy, sys
target, sys.argv = sys.argv[1:], sys.argv[1:]
try:
    if target[0] == "-m":
        sys.argv = [target[1]] + target[2:]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target[0], run_name="__main__")
except SystemExit:
    pass
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
address = libc.malloc(64 << 20)
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        print("HEAP" if start <= address < end else "MAPPED", file=sys.stderr)
        break
else:
    print("MAPPED", file=sys.stderr)
"""

ENTRY_POINTS = {
    "train_dreambooth.py": ["train_dreambooth.py", "--help"],
    "app.py": ["app.py", "--help"],
    "generate": ["-m", "moslora_diffusion.generate", "--help"],
    "mole train": ["-m", "moslora_diffusion.mole", "train", "--help"],
    "mole generate": ["-m", "moslora_diffusion.mole", "generate", "--help"],
    "evaluate": ["-m", "moslora_diffusion.evaluate", "--help"],
}


def _probe(argv: list[str], **env) -> str:
    environment = cli_env(**env)
    if not env:
        environment.pop(allocator.ENV, None)  # the suite itself may run with MOSLORA_MALLOC=default
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=300)
    return result.stderr.strip().splitlines()[-1]


@needs_glibc
@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_every_entry_point_applies_the_settings_first(name):
    assert _probe(ENTRY_POINTS[name]) == "HEAP", f"{name}: a 64 MiB block is still mmap()ed on its own"


@needs_glibc
def test_the_probe_sees_glibc_defaults_when_the_settings_are_off():
    # The same probe with MOSLORA_MALLOC=default: the check above can fail.
    assert _probe(ENTRY_POINTS["generate"], MOSLORA_MALLOC="default") == "MAPPED"


@needs_glibc
def test_the_test_suite_runs_with_the_settings():
    # tests/conftest.py applies them at import; this process has them (none with MOSLORA_MALLOC=default, the
    # suite's "before" timing in docs/cpu-speed.md).
    if os.environ.get(allocator.ENV) == "default":
        assert allocator.tune_allocator() == {}
        return
    assert allocator.tune_allocator() == {"mmap_threshold": allocator.MMAP_THRESHOLD,
                                          "trim_threshold": allocator.TRIM_THRESHOLD, "top_pad": allocator.TOP_PAD}


class _FakeLibc:
    def __init__(self, accepts: bool):
        self.accepts, self.calls = accepts, []

    def mallopt(self, param, value):
        self.calls.append((param.value, value.value))
        return 1 if self.accepts else 0


def test_settings_reported_only_when_glibc_accepts_them(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    accepting = _FakeLibc(accepts=True)
    assert allocator.tune_allocator(accepting) == {"mmap_threshold": 1 << 30, "trim_threshold": 2**31 - 1,
                                                   "top_pad": 64 << 20}
    assert accepting.calls == [(-3, 1 << 30), (-1, 2**31 - 1), (-2, 64 << 20)]  # <malloc.h>'s M_* numbers
    assert allocator.tune_allocator(_FakeLibc(accepts=False)) == {}
    monkeypatch.setenv(allocator.ENV, "default")
    untouched = _FakeLibc(accepts=True)
    assert allocator.tune_allocator(untouched) == {} and untouched.calls == []


@pytest.mark.parametrize("system, libc", [("Darwin", ("", "")), ("Linux", ("musl", "1.2")), ("Windows", ("", ""))])
def test_no_op_where_the_c_library_is_not_glibc(monkeypatch, system, libc):
    monkeypatch.setattr(allocator.platform, "system", lambda: system)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: libc)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a, **k: pytest.fail("loaded a C library"))
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator._glibc() is None
    assert allocator.tune_allocator() == {}


def test_adapter_bit_identical_with_and_without_the_settings(tmp_path, tiny_sd15_dir):
    # Two fresh trainings, same seed: glibc's defaults vs the settings (the full-size SD 1.5 check is
    # benchmarks/fresh_process.py's, which compares the adapters of every run).
    photos = make_photos(tmp_path / "photos", count=2, size=(64, 64))
    weights = {}
    for mode in ("default", "tuned"):
        config = tiny_config(tiny_sd15_dir, photos, tmp_path / mode, resolution=64, train_batch_size=2,
                             max_train_steps=2, seed=5)
        subprocess.run([sys.executable, str(REPO / "train_dreambooth.py"), *cli_args(config)], cwd=REPO, check=True,
                       env=cli_env(MOSLORA_MALLOC=mode, MOSLORA_CACHE_DIR=str(tmp_path / f"cache-{mode}")),
                       capture_output=True, timeout=300)
        weights[mode] = adapter_weights(tmp_path / mode)
    assert weights["default"].keys() == weights["tuned"].keys() and weights["default"]
    ups = [name for name in weights["default"] if "up" in name]
    assert ups and all(weights["default"][name].abs().sum() > 0 for name in ups)  # trained: not the zero init
    assert all(torch.equal(weights["default"][name], weights["tuned"][name]) for name in weights["default"])
