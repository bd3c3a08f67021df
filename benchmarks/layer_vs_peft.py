"""Forward+backward time of one adapted projection: our MoSLoRA layer (and its LoRA kind) vs PEFT's LoRA.

SD 1.5 attention shapes: width 320/640/1280 at 4096/1024/256 tokens (512 px), ranks 4/16/64. The base
weight is frozen and the input requires no grad, as in training. Measured in one run, interleaved, and
reported as ratios to PEFT (target: ours <= 1.05x at every shape).

    python -m benchmarks.layer_vs_peft            # full grid, writes benchmarks/results/layer_vs_peft.{md,json}
    python -m benchmarks.layer_vs_peft --quick    # a smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import RESULTS_DIR, paired_ratio, time_interleaved, write_results
from moslora_diffusion.moslora.layer import MoSLoRALinear

SHAPES = [(320, 4096), (640, 1024), (1280, 256)]  # (width, tokens) of SD 1.5's attention levels at 512 px
RANKS = [4, 16, 64]


def _peft_layer(base: nn.Linear, rank: int, alpha: float) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.proj = base
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=True),
                            holder)
    with torch.no_grad():
        holder.proj.lora_B["default"].weight.normal_(0, 0.1)  # non-zero, like a layer mid-training
    return holder.proj


def _ours(base: nn.Linear, rank: int, alpha: float, kind: str) -> nn.Module:
    layer = MoSLoRALinear(base, rank, alpha, kind=kind)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


def _step_fn(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype, device: str):
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            out = layer(x)
        out.float().pow(2).mean().backward()

    return step


def measure(width: int, tokens: int, rank: int, batch: int, repeats: int, device: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)

    def frozen_base() -> nn.Linear:
        return nn.Linear(width, width, device=device).requires_grad_(False)

    x = torch.randn(batch, tokens, width, device=device)
    layers = {"peft_lora": _peft_layer(frozen_base(), rank, rank),
              "ours_lora": _ours(frozen_base(), rank, rank, "lora"),
              "ours_moslora": _ours(frozen_base(), rank, rank, "moslora")}
    for layer in layers.values():
        layer.to(device)
    times = time_interleaved({k: _step_fn(v, x, dtype, device) for k, v in layers.items()}, repeats, device=device)
    peer = times["peft_lora"]["median_s"]
    return {"width": width, "tokens": tokens, "rank": rank, "batch": batch,
            **{f"{k}_ms": round(v["median_s"] * 1e3, 4) for k, v in times.items()},
            "ours_lora_ratio": round(paired_ratio(times, "ours_lora", "peft_lora"), 3),
            "ours_moslora_ratio": round(paired_ratio(times, "ours_moslora", "peft_lora"), 3),
            "peft_spread_pct": round(100 * (times["peft_lora"]["max_s"] - times["peft_lora"]["min_s"]) / peer, 1)}


def _table(rows: list[dict]) -> str:
    lines = ["| width | tokens | rank | PEFT LoRA ms | ours lora ms | ours moslora ms | lora / PEFT | moslora / PEFT |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['tokens']} | {r['rank']} | {r['peft_lora_ms']:.3f} "
                     f"| {r['ours_lora_ms']:.3f} | {r['ours_moslora_ms']:.3f} | {r['ours_lora_ratio']:.3f} "
                     f"| {r['ours_moslora_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    grid = [(64, 32, 4)] if args.quick else [(w, t, r) for w, t in SHAPES for r in RANKS]
    repeats = 3 if args.quick else args.repeats
    rows = [measure(w, t, r, args.batch, repeats, args.device, dtype) for w, t, r in grid]
    worst = max(max(r["ours_lora_ratio"], r["ours_moslora_ratio"]) for r in rows)
    notes = (f"Forward+backward of one adapted projection, median of {repeats} interleaved runs, {args.device}, "
             f"{args.dtype}, batch {args.batch}. Ratios are medians of per-round ratios (each round runs all three "
             f"back to back); < 1 means we are faster than PEFT. Worst ratio: {worst:.3f} "
             "(target <= 1.05). `peft_spread_pct` in the JSON is PEFT's (max-min)/median: the noise level.")
    name = "layer_vs_peft" + ("_quick" if args.quick else "") + ("" if args.device == "cpu" else "_gpu")
    write_results(name, rows, _table(rows), notes, args.out_dir)
    return rows


if __name__ == "__main__":
    main()
