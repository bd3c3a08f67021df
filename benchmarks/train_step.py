"""One DreamBooth training step on a full-size UNet: the diffusers + PEFT LoRA peer vs ours (lora, moslora).

The peer is set up as diffusers' train_dreambooth_lora scripts do: `unet.add_adapter(LoraConfig(r, lora_alpha,
init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0]))`, trainable params in fp32.
Ours attaches the same targets, rank and alpha. Same UNet weights, data, dtype and optimizer (AdamW on the
adapter parameters). Each timing round runs every variant back to back (paired ratios cancel machine drift);
peak memory is measured per variant in a fresh subprocess (CPU: peak RSS; GPU: max allocated).

    python -m benchmarks.train_step --family sd15 --resolution 256 512            # CPU figures
    python -m benchmarks.train_step --size tiny --rounds 2                         # smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, paired_ratio, time_interleaved, write_results

VARIANTS = ("peft_lora", "ours_lora", "ours_moslora")
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def build_unet(family: str, size: str, dtype: torch.dtype, device: str):
    if size == "tiny":
        from moslora_diffusion.tiny import build_tiny_pipeline

        unet = build_tiny_pipeline("sdxl" if family == "sdxl" else "sd15").unet
    else:
        from moslora_diffusion.full_size import build_components, materialize_random

        unet = materialize_random(build_components("sdxl" if family == "sdxl" else "sd1")["unet"], dtype)
    return unet.to(device=device, dtype=dtype).requires_grad_(False)


def attach_variant(unet, variant: str, rank: int):
    """Adds the variant's adapters; returns its trainable parameters (fp32) and a detach function."""
    if variant == "peft_lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()

        def detach():  # back to plain nn.Linear layers, so the next variant starts from the same UNet
            unet.unload_lora()
            unet.requires_grad_(False)
        return params, detach
    from moslora_diffusion.inject import AdapterConfig, adapter_parameters, attach, detach

    attach(unet, AdapterConfig(kind=variant.removeprefix("ours_"), rank=rank, alpha=rank), TARGETS)
    return adapter_parameters(unet), lambda: detach(unet)


def make_batch(unet, family: str, resolution: int, batch: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    latent = resolution // 8
    ctx_dim = unet.config.cross_attention_dim
    batch_data = {"sample": torch.randn(batch, 4, latent, latent, generator=g),
                  "timestep": torch.randint(0, 1000, (batch,), generator=g),
                  "encoder_hidden_states": torch.randn(batch, 77, ctx_dim, generator=g),
                  "target": torch.randn(batch, 4, latent, latent, generator=g)}
    if family == "sdxl":
        proj = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        batch_data["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, proj, generator=g),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch).float()}
    return {k: (v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                {kk: vv.to(device, dtype) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch_data.items()}


def step_fn(unet, params, batch: dict, dtype: torch.dtype, device: str):
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    kwargs = {"added_cond_kwargs": batch["added_cond_kwargs"]} if "added_cond_kwargs" in batch else {}

    def step():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"], **kwargs).sample
        loss = torch.nn.functional.mse_loss(pred.float(), batch["target"].float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_variants(args, resolution: int, checkpointing: bool) -> dict:
    """All variants in one process on one UNet, rounds interleaved: setup/teardown are not timed."""
    unet = build_unet(args.family, args.size, args.dtype, args.device)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    batch = make_batch(unet, args.family, resolution, args.batch, args.device, args.dtype)
    samples = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            params, detach = attach_variant(unet, variant, args.rank)
            times = time_interleaved({variant: step_fn(unet, params, batch, args.dtype, args.device)},
                                     repeats=1, warmup=1, device=args.device)
            samples[variant] += times[variant]["samples"]
            detach()
    return {v: {"samples": s, "median_s": sorted(s)[len(s) // 2]} for v, s in samples.items()}


def peak_memory(args, variant: str, resolution: int, checkpointing: bool) -> float:
    """MiB: one warm-up step and one measured step of this variant alone, in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--memory-worker", variant, "--family", args.family,
           "--size", args.size, "--resolution", str(resolution), "--rank", str(args.rank), "--batch", str(args.batch),
           "--device", args.device, "--dtype", args.dtype_name]
    cmd += ["--gradient-checkpointing"] if checkpointing else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def _cpu_step_peak_mib(step) -> float:
    """Peak RSS during `step` alone: Linux resets the high-water mark when 5 is written to clear_refs, so
    the model's construction (whose transient peak can exceed training's) is not counted."""
    Path("/proc/self/clear_refs").write_text("5")
    step()
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def memory_worker(args) -> None:
    unet = build_unet(args.family, args.size, args.dtype, args.device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params, _ = attach_variant(unet, args.memory_worker, args.rank)
    step = step_fn(unet, params, make_batch(unet, args.family, args.resolution[0], args.batch, args.device,
                                            args.dtype), args.dtype, args.device)
    step()  # warm-up: optimizer state and allocator caches exist from here on
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _cpu_step_peak_mib(step)
    print(json.dumps({"peak_mib": round(peak, 1)}))


def _row(args, resolution: int, checkpointing: bool) -> dict:
    times = time_variants(args, resolution, checkpointing)
    row = {"family": args.family, "size": args.size, "resolution": resolution, "batch": args.batch,
           "rank": args.rank, "gradient_checkpointing": checkpointing, "dtype": args.dtype_name}
    for variant in VARIANTS:
        row[f"{variant}_s"] = round(times[variant]["median_s"], 4)
        if args.memory:
            row[f"{variant}_peak_mib"] = peak_memory(args, variant, resolution, checkpointing)
    for variant in VARIANTS[1:]:
        row[f"{variant}_time_ratio"] = round(paired_ratio(times, variant, "peft_lora"), 3)
        if args.memory:
            row[f"{variant}_mem_ratio"] = round(row[f"{variant}_peak_mib"] / row["peft_lora_peak_mib"], 3)
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| model | px | ckpt | PEFT s | ours lora s | ours moslora s | moslora/PEFT time | PEFT MiB "
             "| moslora MiB | moslora/PEFT mem |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = (f"{r['peft_lora_peak_mib']:.0f} | {r['ours_moslora_peak_mib']:.0f} | {r['ours_moslora_mem_ratio']:.3f}"
               if "peft_lora_peak_mib" in r else "- | - | -")
        ckpt = "yes" if r["gradient_checkpointing"] else "no"
        lines.append(f"| {r['family']} {r['size']} | {r['resolution']} | {ckpt} | {r['peft_lora_s']:.3f} "
                     f"| {r['ours_lora_s']:.3f} | {r['ours_moslora_s']:.3f} | {r['ours_moslora_time_ratio']:.3f} "
                     f"| {mem} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--resolution", type=int, nargs="+", default=[256])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant (interleaved)")
    parser.add_argument("--checkpointing", default="both", choices=["both", "on", "off"])
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-variant memory runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", dest="dtype_name", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--memory-worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.dtype_name = args.dtype_name or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype_name]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return []
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    rows = [_row(args, res, ckpt) for res in args.resolution for ckpt in modes]
    notes = (f"One training step (forward, backward, AdamW) of the UNet, {args.device}, {args.dtype_name}, batch "
             f"{args.batch}, rank {args.rank}, targets {TARGETS}. Times: medians of {args.rounds} interleaved rounds; "
             "ratios: medians of per-round ratios. Memory: peak during one step after a warm-up step, in a fresh "
             "process per variant (CPU: peak RSS, model included, high-water mark reset before the step; GPU: max "
             "allocated). Targets: moslora/PEFT time <= 0.95, memory <= 1.0.")
    suffix = "" if args.device == "cpu" else "_gpu"
    name = f"train_step_{args.family}_{args.size}{suffix}"
    write_results(name, rows, _table(rows), notes, args.out_dir)
    return rows


if __name__ == "__main__":
    main()
