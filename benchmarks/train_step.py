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
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS_DIR,
    count_aten_ops,
    paired_ratio,
    synchronize,
    time_interleaved,
    write_results,
)
from moslora_diffusion.training.settings.config import DYNAMO_BACKENDS

VARIANTS = ("peft_lora", "ours_lora", "ours_moslora")
# Extra variants: ours with the UNet in channels-last memory format (NHWC convolutions; for GPU runs), ours
# with the frozen linear/conv weights stored in float8 (--fp8_base; needs --dtype bf16 or fp16), and ours with the
# UNet compiled by torch.compile's inductor (--torch_compile; its first step, the compile, is reported apart).
OPTIONAL_VARIANTS = ("ours_moslora_cl", "ours_moslora_fp8", "ours_moslora_compiled")
# Model FLOPs of one LoRA training step per image (forward + backward, frozen base; the figures)
# and dense bf16 peaks, for model-FLOPs utilisation.
STEP_TFLOP_PER_IMAGE = {("sd15", 512): 1.73, ("sdxl", 1024): 14.2}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def build_unet(family: str, size: str, dtype: torch.dtype, device: str):
    if size == "tiny":
        from moslora_diffusion.models.tiny import build_tiny_pipeline

        unet = build_tiny_pipeline("sdxl" if family == "sdxl" else "sd15").unet
    else:
        from moslora_diffusion.models.full_size import build_components, materialize_random

        unet = materialize_random(build_components("sdxl" if family == "sdxl" else "sd1")["unet"], dtype)
    return unet.to(device=device, dtype=dtype).requires_grad_(False)


def attach_variant(unet, variant: str, rank: int, restorable: bool = True, dynamo_backend: str = "inductor"):
    """Adds the variant's adapters; returns its trainable parameters (fp32) and a detach function.

    restorable=False (a memory worker, which never detaches): the float8 variant keeps no copy of the
    weights it rounds, so the copy does not count in its peak. dynamo_backend: the compiled variant's."""
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
    from moslora_diffusion.moslora.inject import AdapterConfig, adapter_parameters, attach, detach
    from moslora_diffusion.training.model.components import compile_unet, store_in_fp8

    kind, _, option = variant.removeprefix("ours_").partition("_")
    channels_last, fp8, compiled = option == "cl", option == "fp8", option == "compiled"
    attach(unet, AdapterConfig(kind=kind, rank=rank, alpha=rank), TARGETS)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    originals = {}
    if fp8:
        if restorable:  # float8 rounding is lossy: keep the weights, so the next variant starts from the same UNet
            originals = {m: [p.data for p in m.parameters()] for m in unet.modules()
                         if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        store_in_fp8(unet)
    if compiled:
        compile_unet(unet, dynamo_backend)

    def undo():
        if compiled:  # Module.compile has no public inverse: drop the compiled call and dynamo's caches
            unet._compiled_call_impl = None
            torch._dynamo.reset()
        detach(unet)
        if channels_last:
            unet.to(memory_format=torch.contiguous_format)
        for module, tensors in originals.items():
            for param, tensor in zip(module.parameters(), tensors, strict=True):
                param.data = tensor
    return adapter_parameters(unet), undo


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


def step_fn(unet, params, batch: dict, dtype: torch.dtype, device: str, channels_last: bool = False):
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # CUDA's default; CPU's is a per-tensor loop
    kwargs = {"added_cond_kwargs": batch["added_cond_kwargs"]} if "added_cond_kwargs" in batch else {}
    sample = batch["sample"].to(memory_format=torch.channels_last) if channels_last else batch["sample"]

    def step():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(sample, batch["timestep"], batch["encoder_hidden_states"], **kwargs).sample
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
    samples, peaks, ops, first_steps = {v: [] for v in args.variants}, {}, {}, {}
    cuda = args.device.startswith("cuda")
    for _ in range(args.rounds):
        for variant in args.variants:
            params, detach = attach_variant(unet, variant, args.rank, dynamo_backend=args.dynamo_backend)
            step = step_fn(unet, params, batch, args.dtype, args.device, variant.endswith("_cl"))
            if variant.endswith("_compiled"):  # the compile happens in this first call
                synchronize(args.device)
                started = time.perf_counter()
                step()
                synchronize(args.device)
                first_steps.setdefault(variant, []).append(time.perf_counter() - started)
            # Two warm-up steps: the first after attaching pays one-off costs (allocator growth, cast caches).
            times = time_interleaved({variant: step}, repeats=args.steps_per_round, warmup=2, device=args.device)
            samples[variant] += times[variant]["samples"]
            if variant not in ops:  # a compiled step runs generated kernels, not ATen operators one by one
                ops[variant] = None if variant.endswith("_compiled") else count_aten_ops(step)
            if cuda:  # in-process peak of one more step: max allocated, which cached blocks do not inflate
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peaks[variant] = max(peaks.get(variant, 0.0), torch.cuda.max_memory_allocated() / 2**20)
            del step, params
            detach()
    return {v: {"samples": s, "median_s": sorted(s)[len(s) // 2], "peak_mib": peaks.get(v), "aten_ops": ops[v],
                "first_step_s": statistics.median(first_steps[v]) if v in first_steps else None}
            for v, s in samples.items()}


def peak_memory(args, variant: str, resolution: int, checkpointing: bool) -> float:
    """MiB: one warm-up step and one measured step of this variant alone, in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--memory-worker", variant, "--family", args.family,
           "--size", args.size, "--resolution", str(resolution), "--rank", str(args.rank), "--batch", str(args.batch),
           "--device", args.device, "--dtype", args.dtype_name, "--dynamo-backend", args.dynamo_backend]
    cmd += ["--gradient-checkpointing"] if checkpointing else []
    # glibc raises its mmap threshold as large blocks are freed, then keeps freed memory resident: a variant that
    # makes many short-lived copies (autocast's upcasts of float8 weights) would look up to ~0.6 GiB bigger than
    # its live tensors. A fixed 128 KiB threshold returns every tensor's memory when it is freed, for all variants.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
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
    params, _ = attach_variant(unet, args.memory_worker, args.rank, restorable=False,
                               dynamo_backend=args.dynamo_backend)
    step = step_fn(unet, params, make_batch(unet, args.family, args.resolution[0], args.batch, args.device,
                                            args.dtype), args.dtype, args.device, args.memory_worker.endswith("_cl"))
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
    for variant in args.variants:
        row[f"{variant}_s"] = round(times[variant]["median_s"], 4)
        row[f"{variant}_aten_ops"] = times[variant]["aten_ops"]
        if times[variant]["first_step_s"] is not None:
            row[f"{variant}_first_step_s"] = round(times[variant]["first_step_s"], 2)
        if times[variant]["peak_mib"] is not None:
            row[f"{variant}_peak_mib"] = round(times[variant]["peak_mib"], 1)
        elif args.memory:
            row[f"{variant}_peak_mib"] = peak_memory(args, variant, resolution, checkpointing)
        flops = STEP_TFLOP_PER_IMAGE.get((args.family, resolution)) if args.size == "full" else None
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(0)), None) \
            if args.device.startswith("cuda") else None
        if flops and peak:
            row[f"{variant}_mfu"] = round(flops * args.batch / times[variant]["median_s"] / peak, 4)
    peer = args.variants[0]
    for variant in args.variants[1:]:
        row[f"{variant}_time_ratio"] = round(paired_ratio(times, variant, peer), 3)
        if f"{peer}_peak_mib" in row:
            row[f"{variant}_mem_ratio"] = round(row[f"{variant}_peak_mib"] / row[f"{peer}_peak_mib"], 3)
    return row


def _table(rows: list[dict]) -> str:
    """One line per configuration and variant; ratios are against the peer (the first variant)."""
    lines = ["| model | px | batch | ckpt | variant | step s | time vs PEFT | peak MiB | memory vs PEFT | MFU "
             "| ATen ops / step |", "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        variants = [k.removesuffix("_s") for k in r if k.endswith("_s") and not k.endswith("_first_step_s")]
        for v in variants:
            cells = [f"{r['family']} {r['size']}", str(r["resolution"]), str(r["batch"]),
                     "yes" if r["gradient_checkpointing"] else "no",
                     v + (f" (first step, the compile: {r[f'{v}_first_step_s']:.0f} s)" if f"{v}_first_step_s" in r
                          else ""), f"{r[f'{v}_s']:.4f}",
                     f"{r.get(f'{v}_time_ratio', 1.0):.3f}",
                     f"{r[f'{v}_peak_mib']:.0f}" if f"{v}_peak_mib" in r else "-",
                     f"{r.get(f'{v}_mem_ratio', 1.0):.3f}" if f"{v}_peak_mib" in r else "-",
                     f"{100 * r[f'{v}_mfu']:.1f}%" if f"{v}_mfu" in r else "-", str(r.get(f"{v}_aten_ops") or "-")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--resolution", type=int, nargs="+", default=[256])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each attaches every variant in turn")
    parser.add_argument("--steps-per-round", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--checkpointing", default="both", choices=["both", "on", "off"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + OPTIONAL_VARIANTS,
                        help="the first is the peer every ratio is taken against")
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-variant memory runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", dest="dtype_name", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--memory-worker", choices=VARIANTS + OPTIONAL_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--dynamo-backend", default="inductor", choices=DYNAMO_BACKENDS,
                        help="torch.compile backend of ours_moslora_compiled (aot_eager: traces only, for smoke runs)")
    parser.add_argument("--name", help="results file name (default: train_step_<family>_<size>, then _gpu off the "
                        "CPU, the dtype when not the device's default, _b<batch> above 1)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.dtype_name = args.dtype_name or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype_name]
    if args.dtype == torch.float32 and any(v.endswith("_fp8") for v in args.variants + [args.memory_worker or ""]):
        parser.error("the float8 variant needs --dtype bf16 or fp16: autocast upcasts its weights")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return []
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    rows = [_row(args, res, ckpt) for res in args.resolution for ckpt in modes]
    notes = (f"One training step (forward, backward, AdamW) of the UNet, {args.device}, {args.dtype_name}, batch "
             f"{args.batch}, rank {args.rank}, targets {TARGETS}. Times: medians over {args.rounds} interleaved "
             f"rounds of {args.steps_per_round} timed steps (after 2 warm-up steps) per variant; ratios: medians of "
             "paired ratios. Memory: peak during one step after warm-up (CPU: in a fresh process per variant, peak "
             "RSS, model included, high-water mark reset before the step, glibc mmap threshold fixed at 128 KiB so "
             "freed tensors leave the resident set; GPU: in process, max allocated). "
             "MFU: the issue's model FLOPs per image (SD 1.5 512 px 1.73 TFLOP, SDXL 1024 px 14.2 TFLOP) over the "
             "step time and the dense bf16 peak (H100: 989 TFLOP/s). Targets: moslora/PEFT time <= 0.95, "
             "memory <= 1.0.")
    suffix = ("" if args.device == "cpu" else "_gpu") + (
        "" if args.dtype_name == ("fp32" if args.device == "cpu" else "bf16") else f"_{args.dtype_name}")
    name = args.name or f"train_step_{args.family}_{args.size}{suffix}" + (f"_b{args.batch}" if args.batch > 1 else "")
    write_results(name, rows, _table(rows), notes, args.out_dir)
    return rows


if __name__ == "__main__":
    main()
