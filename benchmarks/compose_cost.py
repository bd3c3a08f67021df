"""What composing costs per image (issue: composition, "Cost"): LoRA Switch, LoRA Composite, MoLE and regional routing
with 2 experts vs the base model, measured in one run on the same pipeline.

The full-size SD 1.5 architecture with random weights (no download), fp32, CPU. Two experts, each a MoSLoRA adapter
(rank 16, alpha 16) on the UNet attention and the text encoder's attention with non-zero B. Every method runs as a
user calls it, through `composition.compose` (prompt encoding, S denoising steps with classifier-free guidance,
the experts hooked in and taken out again on every call); the base model through the same `run_pipeline`. The
methods take turns (interleaved rounds), and ratios are medians of the per-round ratios. The VAE decode is the
same work for every method and would hide the denoising cost at a few steps, so in the timed runs it is replaced
by a blank image of the right size; it is timed once on its own and added back in the 25-step estimate: S-step
latency x 25 / S + decode (which counts the prompt encoding 25 / S times: it is under 1% of a step).
Targets: Switch = base; Composite about N x, as measured; regional routing <= 1.3x (boxes: left and right half;
`regional_prompts` adds a prompt per region; `regional_latent`: the latent blend with region prompts, one forward
per expert, reported as measured).

    python -m benchmarks.compose_cost --threads 1 --repeats 2 --steps 2      # full size, 512 px; nothing else running
    python -m benchmarks.compose_cost --size tiny --resolution 64 --repeats 1 --name compose_cost_smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, paired_ratio, time_interleaved, write_results
from benchmarks.mole_cost import build_pipeline, randomize_gates, write_experts
from moslora_diffusion.composition import Region, compose
from moslora_diffusion.composition.latent_blend import fit_steps_for
from moslora_diffusion.generation.text_to_image import GenerationRequest, make_scheduler, run_pipeline
from moslora_diffusion.mole import attach_mole, detach_mole, load_experts

EXPERTS = 2
ESTIMATE_STEPS = 25


def methods(pipe, experts, req: GenerationRequest) -> dict:
    """{name: a call making one image as a user would}."""
    mole = attach_mole(pipe, experts)  # learned-looking (random, input-dependent) gates
    randomize_gates(mole)
    gates = detach_mole(pipe).gate_state()
    names = [e.name for e in experts]
    boxes = [Region(names[0], box=(0.0, 0.0, 0.5, 1.0)), Region(names[1], box=(0.5, 0.0, 1.0, 1.0))]
    prompted = [Region(r.expert, box=r.box, prompt=f"a photo of sks{i} thing") for i, r in enumerate(boxes)]

    def base():
        pipe.scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
        run_pipeline(pipe, req, None)

    def method(name, **kwargs):
        return lambda: compose(pipe, experts, name, req, **kwargs)

    fns = {"base": base, "switch": method("switch", every=1), "composite": method("composite"),
           "mole": method("mole", gates=gates), "regional": method("regional", regions=boxes),
           "regional_prompts": method("regional", regions=prompted),
           "regional_latent": method("regional", regions=prompted, blend="latent"),
           "regional_latent_fitted": method("regional", regions=prompted, blend="latent",
                                            fit_steps=fit_steps_for(req.steps)),
           "regional_inpaint_fitted": method("regional", regions=prompted, blend="inpaint",
                                             fit_steps=fit_steps_for(req.steps))}
    return fns


def counted_run(pipe, fns: dict, steps: int) -> tuple[dict[str, float], dict[str, int]]:
    """Runs every method once (the warm-up round) counting its UNet forwards and VAE decodes: ({name: forwards
    per step}, {name: decodes per image}). Counted, not assumed: the latent blend skips the base where the regions
    cover the image, and once fitted runs it where the subjects leave room; the inpaint blend decodes each pass."""
    calls, decodes = [0], [0]
    original, decode = pipe.unet.forward, pipe.vae.decode

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    def counting_decode(*args, **kwargs):
        decodes[0] += 1
        return decode(*args, **kwargs)

    pipe.unet.forward = counting  # the methods wrap whatever forward the UNet has, so each of theirs is counted
    pipe.vae.decode = counting_decode
    try:
        counts, decoded = {}, {}
        for name, fn in fns.items():
            calls[0] = decodes[0] = 0
            fn()
            counts[name], decoded[name] = calls[0] / steps, decodes[0]
    finally:
        del pipe.unet.forward
        pipe.vae.decode = decode
    return counts, decoded


@contextmanager
def blank_decode(pipe):
    """The pipeline's VAE decode returns a blank image of the right shape (the same for every method)."""
    factor = pipe.vae_scale_factor

    def decode(latents, return_dict=False, generator=None):
        b, _, h, w = latents.shape
        return (torch.zeros(b, 3, h * factor, w * factor, dtype=latents.dtype),)

    pipe.vae.decode = decode
    try:
        yield
    finally:
        del pipe.vae.decode


def decode_seconds(pipe, px: int) -> float:
    latents = torch.randn(1, 4, px // pipe.vae_scale_factor, px // pipe.vae_scale_factor)

    def call():
        with torch.no_grad():
            pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    return time_interleaved({"vae": call}, 1, warmup=0)["vae"]["median_s"]


def measure(pipe, paths: list[Path], req: GenerationRequest, repeats: int, chosen: Sequence[str] | None = None
            ) -> tuple[list[dict], float]:
    """Rows per method (`chosen`: only these, beside the base; None: all) and the VAE decode's seconds."""
    experts = load_experts(pipe, paths)
    fns = methods(pipe, experts, req)
    fns = {name: fn for name, fn in fns.items() if chosen is None or name == "base" or name in chosen}
    with blank_decode(pipe):
        forwards, decodes = counted_run(pipe, fns, req.steps)  # the warm-up round
        times = time_interleaved(fns, repeats, warmup=0)
    vae = decode_seconds(pipe, req.width)
    base_25 = times["base"]["median_s"] * ESTIMATE_STEPS / req.steps + vae * decodes["base"]
    rows = []
    for name in fns:
        latency = times[name]["median_s"]
        estimate = latency * ESTIMATE_STEPS / req.steps + vae * decodes[name]
        rows.append({"method": name, "unet_forwards_per_step": forwards[name], "vae_decodes": decodes[name],
                     "latency_s": latency,
                     "samples_s": times[name]["samples"], "ratio": paired_ratio(times, name, "base"),
                     f"per_image_{ESTIMATE_STEPS}_steps_s": estimate,
                     f"ratio_{ESTIMATE_STEPS}_steps": estimate / base_25})
    return rows, vae


def table(rows: list[dict], steps: int) -> str:
    lines = [f"| method | UNet forwards / step | {steps}-step latency (no decode) | / base | "
             f"{ESTIMATE_STEPS}-step image (with decode, estimated) | / base |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['unet_forwards_per_step']:g} | {r['latency_s']:.2f} s | {r['ratio']:.3f} | "
                     f"{r[f'per_image_{ESTIMATE_STEPS}_steps_s']:.1f} s | {r[f'ratio_{ESTIMATE_STEPS}_steps']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="full-size SD 1.5 or the tiny one")
    parser.add_argument("--resolution", type=int, default=512, help="image side (px)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per timed image")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=None, help="time only these beside the base (default: all)")
    parser.add_argument("--name", default="compose_cost")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    req = GenerationRequest("a photo of sks0 thing and sks1 thing", steps=args.steps, width=args.resolution,
                            height=args.resolution, scheduler="DDIM", seed=0)
    pipe = build_pipeline(args.size)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_experts(pipe, args.rank, Path(tmp), EXPERTS)
        rows, vae = measure(pipe, paths, req, args.repeats, args.methods)
    notes = (f"{'Full-size SD 1.5' if args.size == 'full' else 'Tiny SD 1.5'} architecture, random weights, fp32, "
             f"CPU, {torch.get_num_threads()} threads. {EXPERTS} experts (MoSLoRA rank {args.rank} on UNet and text "
             f"attention); {args.resolution} px, {args.steps} DDIM steps, guidance 7.5 (batch 2 per UNet forward). "
             f"Per image as the package's generate functions make it, without the VAE decode ({vae:.1f} s, timed "
             f"once, added back in the {ESTIMATE_STEPS}-step estimate once per decode the method makes: the inpaint "
             f"blend decodes each of its passes). Medians of "
             f"{args.repeats} interleaved rounds after one warm-up round; ratios are medians of per-round ratios "
             "(benchmarks/common.py). Switch: one expert per step (every=1 here; the interval does not change the "
             "cost). MoLE: learned-looking gates on every block. Regional: expert 1 on the left half, expert 2 on "
             "the right half; regional_prompts: each region also reads its own prompt; regional_latent: the latent "
             "blend (each region denoised by its expert alone, predictions blended), with region prompts; "
             f"regional_latent_fitted: the same fitted after {fit_steps_for(args.steps)} of its {args.steps} steps "
             "(from then on the base model also runs, where the subjects leave room: over 20 steps fitted after "
             "6, 0.3 x 2 + 0.7 x 3 = 2.7 forwards a step); regional_inpaint_fitted: the inpaint blend (expert 1 "
             "draws the picture, expert 2 drawn over it in its half, one pass each), fitted likewise. UNet "
             "forwards per step and VAE decodes are counted in the warm-up "
             "round (guidance's two halves are one batched forward).\n\n"
             "    python -m benchmarks.compose_cost " + " ".join(sys.argv[1:] if argv is None else argv))
    write_results(args.name, rows + [{"method": "vae_decode", "latency_s": vae}], table(rows, args.steps), notes,
                  args.out_dir)
    return rows


if __name__ == "__main__":
    main()
