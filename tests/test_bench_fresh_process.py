"""The fresh-process benchmark's parts: what it starts for each variant, and what it reads back from a child
(no timing assertions: figures live in benchmarks/results; a smoke run: its docstring)."""

import sys
from pathlib import Path

import pytest

from benchmarks import fresh_process


def _args(tmp_path, *extra):
    return fresh_process.parse_args(["--model", "tiny", "--peer-script", str(tmp_path / "absent.py"), *extra])


def test_variants_differ_only_in_the_allocator_setting_and_the_cache(tmp_path):
    args, work = _args(tmp_path), tmp_path / "work"
    commands = {v: fresh_process.variant_command(v, args, work, tmp_path / v) for v in fresh_process.VARIANTS}
    assert commands["today"][1]["MOSLORA_MALLOC"] == "default" == commands["today_rerun"][1]["MOSLORA_MALLOC"]
    assert "MOSLORA_MALLOC" not in commands["ours"][1] and "MOSLORA_MALLOC" not in commands["ours_rerun"][1]
    cache = {v: argv[argv.index("--latent_cache_dir") + 1] for v, (argv, _) in commands.items() if v != "peer"}
    assert cache["ours_rerun"] == cache["today_rerun"] == str(work / "latent-cache-earlier")
    assert cache["ours"] == str(tmp_path / "ours" / "latent-cache")  # a first run: an empty cache of its own
    strip = {v: [a for a in argv if not a.startswith(str(tmp_path))] for v, (argv, _) in commands.items()}
    assert strip["ours"] == strip["today"] and strip["ours"][1].endswith("train_dreambooth.py")
    peer_argv = commands["peer"][0]
    assert peer_argv[1:3] == ["-m", "benchmarks.dreambooth_peer"]  # the script is absent: the in-repo peer
    assert peer_argv[3:] == fresh_process.common_flags(args, work, tmp_path / "peer")
    assert all(env["OMP_NUM_THREADS"] == "2" for _, env in commands.values())


def test_the_diffusers_script_is_the_peer_when_present(tmp_path):
    script = tmp_path / "train_dreambooth_lora.py"
    script.write_text("")
    args = fresh_process.parse_args(["--peer-script", str(script)])
    argv, _ = fresh_process.variant_command("peer", args, tmp_path, tmp_path / "out")
    assert argv[1] == str(script)


def test_a_child_is_measured_from_outside():
    # A child that touches 256 MiB: its peak RSS and minor faults must show it.
    child = "import ctypes; b = bytearray(256 << 20); b[::4096] = b'x' * len(b[::4096])"
    run = fresh_process.run_process([sys.executable, "-c", child], {"PATH": "/usr/bin:/bin"})
    assert run["max_rss_mib"] >= 256 and run["minor_faults"] >= (256 << 20) // 4096
    assert run["wall_s"] > 0 and run["user_s"] + run["sys_s"] > 0 and len(run["loadavg_before"]) == 3
    with pytest.raises(RuntimeError, match="exited 3"):
        fresh_process.run_process([sys.executable, "-c", "raise SystemExit(3)"], {})


def test_rows_pair_each_round_with_the_peer_and_today():
    def run(wall, rss, sha="a"):
        return {"wall_s": wall, "user_s": wall, "sys_s": wall / 10, "max_rss_mib": rss, "minor_faults": 1,
                "major_faults": 0, "loadavg_before": [1.0, 1.0, 1.0], "adapter_sha256": sha}

    samples = {"peer": [run(100, 1), run(200, 1)], "ours": [run(50, 2), run(150, 2)],
               "today": [run(100, 4), run(100, 1)]}
    rows = {r["variant"]: r for r in fresh_process.build_rows(samples, "peer name")}
    assert rows["ours"]["wall_ratio_vs_peer"] == pytest.approx((0.5 + 0.75) / 2)  # per-round ratios, median
    assert rows["ours"]["wall_ratio_vs_today"] == pytest.approx((0.5 + 1.5) / 2)
    assert rows["ours"]["rss_ratio_vs_today"] == pytest.approx((0.5 + 2.0) / 2)
    assert rows["ours"]["sys_share_of_wall"] == pytest.approx(0.1) and rows["peer"]["peer"] == "peer name"


def test_adapter_digest_follows_the_tensors_not_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"a.up": torch.arange(6.0).view(2, 3), "a.down": torch.ones(3)}
    for name, metadata in (("one", {"when": "1"}), ("two", {"when": "2"})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(Path(tmp_path / name / "moslora.safetensors")), metadata=metadata)
    assert fresh_process.adapter_digest(tmp_path / "one") == fresh_process.adapter_digest(tmp_path / "two")
    save_file({**tensors, "a.down": torch.ones(3) * 1.0000001}, str(tmp_path / "two" / "moslora.safetensors"))
    assert fresh_process.adapter_digest(tmp_path / "one") != fresh_process.adapter_digest(tmp_path / "two")
