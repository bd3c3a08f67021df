"""What every benchmark shares: the machine description, robust timing, and result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Where and with what a figure was measured: results are only comparable within one run."""
    import diffusers
    import peft
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict, repeats: int, warmup: int = 2, device: str = "cpu") -> dict[str, dict]:
    """Median, spread and raw samples of each callable, run in turns so machine drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "n": len(s), "samples": s}
            for name, s in samples.items()}


def paired_ratio(times: dict[str, dict], name: str, peer: str) -> float:
    """Median over rounds of name/peer: each round ran both back to back, so machine drift cancels."""
    return statistics.median(a / b for a, b in zip(times[name]["samples"], times[peer]["samples"], strict=True))


def write_results(name: str, rows: list[dict], markdown_table: str, notes: str = "",
                  out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """benchmarks/results/<name>.json (raw) and .md (the table a person reads); prints the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in info.items())
    md_path.write_text(f"# {name}\n\n{notes}\n\n{markdown_table}\n\n## Machine\n\n{header}\n")
    print(f"{markdown_table}\n\nwrote {md_path} and {json_path}")
    return json_path, md_path


def count_aten_ops(fn) -> int:
    """ATen operator calls made by `fn()`: on a GPU that waits on the CPU to launch kernels (a UNet at batch 1
    runs at ~1% of an H100's FLOP rate), step time follows this count more than FLOPs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls
