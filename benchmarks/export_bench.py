"""Time and peak memory of the merged single-file export (merge one adapter, convert, write).

Full size: SD 1.5 (fp32 and fp16) and SDXL (fp16) built from their public configs with random weights
(architecture, not weight values, sets the cost), a rank-16 adapter on the UNet and text-encoder
attention, exported at scale 0.8 to a temporary file. Each case runs in its own process so its peak
RSS (`resource.getrusage(...).ru_maxrss`, the OS figure; tracemalloc cannot see torch tensors) is its
own. Loading the base model from disk is not included: it depends on the disk and the source format.

    python -m benchmarks.export_bench --size full   # writes benchmarks/results/export.{md,json}
    python -m benchmarks.export_bench --size tiny   # tiny models: a smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, write_results

CASES = {"full": [("sd1", "fp32"), ("sd1", "fp16"), ("sdxl", "fp16")], "tiny": [("sdxl", "fp16")]}
GIB = 2**30


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak is the best we have)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _build(family: str, size: str, dtype: torch.dtype):
    if size == "tiny":
        from moslora_diffusion.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline(family).to(dtype)
    from moslora_diffusion.models.full_size import build_random_pipeline

    return build_random_pipeline(family, dtype)


def _save_random_adapter(pipe, path: Path, rank: int) -> None:
    from moslora_diffusion import AdapterConfig, attach_to_pipeline, pipeline_adapters, save_adapter
    from moslora_diffusion.moslora.pipeline import detach_from_pipeline

    attach_to_pipeline(pipe, AdapterConfig(rank=rank, alpha=rank), text_targets="attn")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layers in pipeline_adapters(pipe).values():
            for layer in layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.01)
    save_adapter(pipe, path)
    detach_from_pipeline(pipe)


def run_case(family: str, size: str, dtype_name: str) -> dict:
    """One export, measured in this process (call it in a fresh one for a clean peak)."""
    from moslora_diffusion.formats.export_targets import DTYPES, export_pipeline

    dtype = DTYPES[dtype_name]
    start = time.perf_counter()
    pipe = _build(family, size, dtype)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        adapter = Path(tmp) / "adapter.safetensors"
        _save_random_adapter(pipe, adapter, rank=16 if size == "full" else 4)
        rss_before, load = _rss_bytes(), os.getloadavg()[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        out = export_pipeline(pipe, [(adapter, 0.8)], "merged-single-file", Path(tmp) / "merged.safetensors",
                              dtype=dtype_name, base=f"random {family}")
        export_s, export_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        file_bytes = out.stat().st_size
    peak = _peak_rss_bytes()
    return {"family": family, "size": size, "dtype": dtype_name, "params_M": round(params / 1e6, 1),
            "file_GiB": round(file_bytes / GIB, 3), "build_s": round(build_s, 2), "export_s": round(export_s, 2),
            "export_cpu_s": round(export_cpu_s, 2), "load_avg_1m": round(load, 2),
            "rss_before_export_GiB": round(rss_before / GIB, 2), "peak_rss_GiB": round(peak / GIB, 2),
            "export_extra_GiB": round(max(peak - rss_before, 0) / GIB, 2)}


def _run_in_subprocess(family: str, size: str, dtype: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "benchmarks.export_bench", "--case", family, dtype,
                             "--size", size], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).resolve().parent.parent)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark case {family}/{dtype} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    lines = ["| model | dtype | params (M) | file (GiB) | export wall s | export CPU s | load avg | RSS before export "
             "(GiB) | peak RSS (GiB) | export extra (GiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r['family']} ({r['size']})"] + [r[k] for k in ("dtype", "params_M", "file_GiB", "export_s",
                                                                   "export_cpu_s", "load_avg_1m",
                                                                   "rss_before_export_GiB", "peak_rss_GiB",
                                                                   "export_extra_GiB")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--size", choices=tuple(CASES), default="full")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--case", nargs=2, metavar=("FAMILY", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # the child process: one case, its row as the last line of stdout
        print(json.dumps(run_case(args.case[0], args.size, args.case[1])))
        return []
    rows = [_run_in_subprocess(family, args.size, dtype) for family, dtype in CASES[args.size]]
    name = "export" if args.size == "full" else f"export_{args.size}"
    notes = ("Merged single-file export (bake one rank-16 MoSLoRA adapter into UNet + text encoders, convert to "
             "the original layout, write one .safetensors) from a pipeline already in memory, CPU. Weights are "
             "random (full-size public configs); base-model loading is not included. Peak RSS is the process "
             "maximum (`ru_maxrss`), one process per row; 'export extra' = peak - RSS just before the export. CPU s is "
             "the process's user+sys time (all threads); wall time includes the fsync of the file and, on a shared "
             "machine, waiting for a core: 'load avg' is the 1-minute load when the export started.")
    write_results(name, rows, _table(rows), notes, out_dir=args.out_dir)
    print(_table(rows))
    return rows


if __name__ == "__main__":
    main()
