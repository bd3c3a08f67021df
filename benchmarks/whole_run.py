"""Wall time of a whole DreamBooth run with prior preservation: diffusers' train_dreambooth_lora.py vs ours.

Three variants, all timed in one process, rounds interleaved (the order rotates every round):

- peer: what users otherwise run, diffusers' `examples/dreambooth/train_dreambooth_lora.py`, re-written
  compactly in benchmarks/dreambooth_peer.py (`peer_train`) with the same per-step work: images opened and
  transformed by the data loader, the batch VAE-encoded, the prompts encoded by the text encoder, UNet LoRA
  through `unet.add_adapter(LoraConfig(...))`, AdamW, prior-preservation loss on the concatenated class half;
- ours: `train_dreambooth.py` (moslora_diffusion.training.train) with its default flags (a MoSLoRA
  adapter; frozen text encoders, so every distinct prompt is encoded once; every distinct image, after
  crop and flip, is VAE-encoded once: training/step/posteriors.py);
- ours_cached: the same plus `--cache_latents` (every dataset item encoded before the steps);
- ours_rerun: ours' default flags again, after an earlier (untimed) run on the same photos and class folder
  left its VAE posteriors in the on-disk latent cache (training/step/posterior_store.py): the everyday case of
  training once more with another learning rate, rank or step count. `ours` and `ours_cached` each start
  from an empty cache (and pay for writing it), so they are first-run figures.

Same model, images, rank/alpha/targets, batch size, lr, resolution, dtype, seed and steps. A run's wall
time goes from the call that starts it to its adapter on disk (loading the model, data, VAE/text work,
the steps, logging, saving); the library imports and an untimed warm-up run per variant come first, so
one-time costs are excluded for both sides alike. Class images are written to the class folder before
anything is timed (both trainers find them present and generate none).

    python -m benchmarks.whole_run                                   # CPU figure: small model, 100 steps
    python -m benchmarks.whole_run --model full-sd15 --device cuda   # full-size SD 1.5 (random weights), 512 px
    python -m benchmarks.whole_run --model tiny --steps 3 --repeats 1 --num-class-images 4   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, write_results
from benchmarks.dreambooth_peer import CLASS_PROMPT, INSTANCE_PROMPT, TARGETS, RunSpec, peer_train

REPO = Path(__file__).resolve().parents[1]
TOY_BASE = REPO / "assets" / "toy-base"
TOY_SUBJECT = REPO / "assets" / "toy-subject"
VARIANTS = ("peer", "ours", "ours_cached", "ours_rerun")
DESCRIPTIONS = {
    "peer": "diffusers train_dreambooth_lora.py loop (PEFT LoRA; VAE + text encoder every step)",
    "ours": "train_dreambooth.py, default flags (MoSLoRA; each distinct prompt and image encoded once)",
    "ours_cached": "train_dreambooth.py --cache_latents (every item encoded before the steps)",
    "ours_rerun": "train_dreambooth.py, default flags, rerun: an earlier run's posteriors in the latent cache",
}




# --- ours ------------------------------------------------------------------------------------------------------


def ours_train(spec: RunSpec, output_dir: Path, cache_latents: bool, latent_cache_dir: Path) -> dict:
    """One whole run of train_dreambooth.py (in process); returns {"wall_s", "cpu_s", "loop_s", "vae_encoded"}."""
    from moslora_diffusion.training import parse_args, train
    from moslora_diffusion.training.run_folder.outputs import ADAPTER_FILE

    argv = ["--pretrained_model_name_or_path", spec.model, "--instance_data_dir", spec.instance_dir,
            "--instance_prompt", INSTANCE_PROMPT, "--with_prior_preservation", "--class_data_dir", spec.class_dir,
            "--class_prompt", CLASS_PROMPT, "--num_class_images", str(spec.num_class_images),
            "--resolution", str(spec.resolution), "--rank", str(spec.rank), "--lora_alpha", str(spec.rank),
            "--learning_rate", str(spec.learning_rate), "--max_train_steps", str(spec.steps),
            "--train_batch_size", str(spec.train_batch_size), "--seed", str(spec.seed),
            "--mixed_precision", spec.mixed_precision, "--report_to", spec.report_to,
            "--output_dir", str(output_dir), "--latent_cache_dir", str(latent_cache_dir)]
    config = parse_args(argv + (["--cache_latents"] if cache_latents else []))
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train(config)
    wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    if not (output_dir / ADAPTER_FILE).is_file():
        raise RuntimeError(f"our trainer wrote no {ADAPTER_FILE}")
    return {"wall_s": wall_s, "cpu_s": cpu_s, "loop_s": result.loop_seconds, "vae_encoded": result.vae_encoded}


def run_variant(variant: str, spec: RunSpec, output_dir: Path, rerun_cache: Path) -> dict:
    """One run; ours' first-run variants get an empty latent cache beside their output, removed with it."""
    if variant == "peer":
        return peer_train(spec, output_dir)
    cache = rerun_cache if variant == "ours_rerun" else output_dir / "latent-cache"
    return ours_train(spec, output_dir, cache_latents=variant == "ours_cached", latent_cache_dir=cache)


# --- inputs (prepared once, not timed) -------------------------------------------------------------------------


def prepare_model(choice: str | None, work: Path) -> tuple[str, str]:
    """(diffusers folder, what it is) for --model: a folder, "tiny", "full-sd15", or None (toy base, else tiny)."""
    if choice is None:
        choice = str(TOY_BASE) if (TOY_BASE / "model_index.json").is_file() else "tiny"
    if choice == "tiny":
        from moslora_diffusion.models.tiny import save_tiny_pipeline

        return str(save_tiny_pipeline("sd15", work / "model")), (
            "tiny SD 1.5 from moslora_diffusion.tiny (random weights; 2-block UNet, 2-block VAE)")
    if choice == "full-sd15":
        from moslora_diffusion.models.full_size import build_random_pipeline

        # build_components("sd1") + materialize_random: the SD 1.5 architecture with random weights, saved as
        # a diffusers folder (fp32) so both trainers load it from disk as they would a downloaded model.
        build_random_pipeline("sd1", torch.float32).save_pretrained(work / "model", safe_serialization=True)
        return str(work / "model"), "full-size SD 1.5 architecture (random weights, fp32 on disk)"
    path = Path(choice).expanduser().resolve()
    if not (path / "model_index.json").is_file():
        raise SystemExit(f"--model {choice}: not a diffusers folder (no model_index.json), nor tiny / full-sd15")
    name = "toy base (assets/toy-base)" if path == TOY_BASE.resolve() else str(path)
    return str(path), name


def native_resolution(model: str) -> int:
    """The UNet's sample size times the VAE's downsampling: 512 for SD 1.5, 32 for the tiny model."""
    import json

    unet = json.loads((Path(model) / "unet" / "config.json").read_text())
    vae = json.loads((Path(model) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _fit(image, size: int):
    from PIL import Image

    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.LANCZOS if image.width > size else Image.Resampling.BICUBIC)


def prepare_images(instance_source: Path, work: Path, resolution: int, num_class_images: int) -> tuple[Path, Path]:
    """Instance photos (square, at the training resolution) and the class images, both already on disk."""
    import numpy as np
    from PIL import Image

    from moslora_diffusion.data import find_photos
    from moslora_diffusion.toy.world import render, sample_scene

    instance_dir, class_dir = work / "instance", work / "class"
    instance_dir.mkdir(parents=True)
    class_dir.mkdir(parents=True)
    sources = [p.path for p in find_photos(instance_source).photos]  # not the masks beside them
    if not sources:
        raise SystemExit(f"--instance-dir {instance_source}: no images")
    for i, path in enumerate(sources):
        with Image.open(path) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            _fit(image.crop((left, top, left + side, top + side)), resolution).save(instance_dir / f"{i:03d}.png")
    # Class images: stars of the toy world (any colour, position, background), as a base model would draw
    # "a photo of a star"; rendered at 64 px and resized to the training resolution.
    rng = np.random.default_rng(0)
    for i in range(num_class_images):
        scene = replace(sample_scene(rng), cls="star")
        _fit(render(scene), resolution).save(class_dir / f"class_{i:05d}.png")
    return instance_dir, class_dir


def _import_everything() -> None:
    """Library imports both sides use, done before any clock starts."""
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from diffusers.loaders import StableDiffusionLoraLoaderMixin  # noqa: F401
    from torch.utils import tensorboard  # noqa: F401
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer  # noqa: F401

    import moslora_diffusion.training  # noqa: F401


# --- the benchmark ---------------------------------------------------------------------------------------------


def time_runs(spec: RunSpec, work: Path, repeats: int, warmup_steps: int) -> dict[str, dict]:
    """The earlier run behind ours_rerun and untimed warm-up runs, then `repeats` rounds of every variant
    (order rotated each round)."""
    rerun_cache = work / "latent-cache-of-an-earlier-run"

    def one(variant: str, run_spec: RunSpec, tag: str) -> dict:
        out = work / "runs" / f"{variant}-{tag}"
        result = run_variant(variant, run_spec, out, rerun_cache)
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        return result

    earlier = work / "runs" / "earlier"  # the same run as ours, leaving its posteriors in the rerun cache
    ours_train(spec, earlier, cache_latents=False, latent_cache_dir=rerun_cache)
    shutil.rmtree(earlier, ignore_errors=True)
    if warmup_steps:
        for variant in VARIANTS:
            one(variant, replace(spec, steps=warmup_steps), "warmup")
    samples = {v: [] for v in VARIANTS}
    for round_index in range(repeats):
        shift = round_index % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            samples[variant].append(one(variant, spec, str(round_index)))
    return samples


def _paired(samples: dict, name: str, base: str, key: str = "wall_s") -> float:
    return statistics.median(a[key] / b[key] for a, b in zip(samples[name], samples[base], strict=True))


def build_rows(samples: dict, spec: RunSpec, model_name: str, device: str) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        walls = [s["wall_s"] for s in samples[variant]]
        loops = [s["loop_s"] for s in samples[variant]]
        row = {"variant": variant, "what": DESCRIPTIONS[variant], "model": model_name, "device": device,
               "resolution": spec.resolution, "steps": spec.steps, "rank": spec.rank,
               "num_class_images": spec.num_class_images, "mixed_precision": spec.mixed_precision,
               "wall_s": round(statistics.median(walls), 3), "wall_min_s": round(min(walls), 3),
               "wall_max_s": round(max(walls), 3), "loop_s": round(statistics.median(loops), 3),
               "outside_loop_s": round(statistics.median(w - lp for w, lp in zip(walls, loops, strict=True)), 3),
               "cpu_s": round(statistics.median(s["cpu_s"] for s in samples[variant]), 3),
               "samples_s": [round(w, 3) for w in walls]}
        if variant != "peer":
            row["ratio_vs_peer"] = round(_paired(samples, variant, "peer"), 3)
            row["cpu_ratio_vs_peer"] = round(_paired(samples, variant, "peer", "cpu_s"), 3)
        if variant in ("ours_cached", "ours_rerun"):
            row["ratio_vs_ours_default"] = round(_paired(samples, variant, "ours"), 3)
            row["cpu_ratio_vs_ours_default"] = round(_paired(samples, variant, "ours", "cpu_s"), 3)
        if variant != "peer":
            row["vae_rows_encoded"] = statistics.median(s["vae_encoded"] for s in samples[variant])
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| variant | wall s (median) | min-max s | steps loop s | outside loop s | wall / peer | CPU s "
             "| CPU / peer | what |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['ratio_vs_peer']:.3f}" if "ratio_vs_peer" in r else "1"
        cpu_ratio = f"{r['cpu_ratio_vs_peer']:.3f}" if "cpu_ratio_vs_peer" in r else "1"
        lines.append(f"| {r['variant']} | {r['wall_s']:.2f} | {r['wall_min_s']:.2f}-{r['wall_max_s']:.2f} "
                     f"| {r['loop_s']:.2f} | {r['outside_loop_s']:.2f} | {ratio} | {r['cpu_s']:.2f} | {cpu_ratio} "
                     f"| {r['what']} |")
    return "\n".join(lines)


def _notes(args, spec: RunSpec, model_name: str, rows: list[dict]) -> str:
    by = {r["variant"]: r for r in rows}
    cached, rerun = by["ours_cached"], by["ours_rerun"]
    one_epoch = max(spec.num_class_images, spec.num_instance_images)
    return "\n".join([
        f"Whole DreamBooth run with prior preservation, {spec.steps} steps, batch {spec.train_batch_size} "
        f"(+ {spec.train_batch_size} class row), {spec.resolution} px, rank {spec.rank} = alpha, targets {TARGETS}, "
        f"lr {spec.learning_rate}, AdamW, max grad norm {spec.max_grad_norm}, seed {spec.seed}, "
        f"mixed precision {spec.mixed_precision}, report_to {spec.report_to} (both scripts' default), "
        f"{args.device}, torch threads {torch.get_num_threads()}.",
        "",
        f"- Model: {model_name}.",
        f"- Data: {spec.num_instance_images} instance images ({args.instance_dir}, "
        f"resized to {spec.resolution} px), {spec.num_class_images} class images already in the class folder "
        "(toy-world stars, rendered before timing): neither trainer generates any.",
        "- Wall time: from the call that starts a run to its adapter written (model loading from disk, data, "
        "VAE and text-encoder work, the steps, logging, saving). Library imports and one untimed warm-up run "
        f"of {args.warmup_steps} steps per variant come first, for all variants alike. "
        f"{args.repeats} interleaved rounds (order rotated each round); ratios are medians of per-round ratios. "
        "CPU s: the process's CPU time over the same span (less sensitive than wall time to other load on a "
        "shared machine; on a GPU it misses the device's work).",
        "- Not timed for the peer: the script's \"final inference\" after saving (it reloads the pipeline and "
        "loads the LoRA back). Timed for ours: everything `train()` does after the adapter is written too (the "
        "folded diffusers LoRA, the kohya LoRA, the model card, the config).",
        "- `ours` (default flags) encodes each distinct prompt once (frozen text encoder) and VAE-encodes each "
        "distinct image (after crop and flip) once, when first drawn; `ours_cached` adds `--cache_latents` "
        "(every dataset item encoded before the steps, freezing the first crop and flip). Both start from an "
        "empty on-disk latent cache and write this run's posteriors to it: first-run figures. `ours_rerun` is "
        "ours' default flags again after one earlier, untimed run of the same settings on the same photos and "
        "class folder, whose posteriors are in the cache (training once more with another learning rate, rank "
        "or step count reads them just the same).",
        f"- A dataset item is one instance + one class image; there are {one_epoch} items, so {spec.steps} steps "
        f"of batch {spec.train_batch_size} are {spec.steps * spec.train_batch_size / one_epoch:.2f} epoch(s). "
        f"With {spec.num_instance_images} distinct instance photos the peer VAE-encodes "
        f"{2 * spec.steps * spec.train_batch_size} rows, ours at most "
        f"{min(spec.num_instance_images, spec.steps * spec.train_batch_size)} instance + "
        f"{min(spec.num_class_images, spec.steps * spec.train_batch_size)} class rows (measured: "
        f"{by['ours']['vae_rows_encoded']:g}), a rerun {rerun['vae_rows_encoded']:g}.",
        "",
        f"Result: ours / peer = {by['ours']['ratio_vs_peer']:.3f} (first run, default flags), "
        f"{cached['ratio_vs_peer']:.3f} (first run, --cache_latents), {rerun['ratio_vs_peer']:.3f} (rerun, "
        f"default flags); target <= 0.8. Against ours' first run: --cache_latents "
        f"{cached['ratio_vs_ours_default']:.3f}x, the rerun {rerun['ratio_vs_ours_default']:.3f}x. CPU time: "
        f"ours / peer = {by['ours']['cpu_ratio_vs_peer']:.3f}, {cached['cpu_ratio_vs_peer']:.3f} and "
        f"{rerun['cpu_ratio_vs_peer']:.3f}.",
    ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--model", default=None,
                        help="a diffusers SD 1.x folder, 'tiny' (moslora_diffusion.tiny SD 1.5), or 'full-sd15' "
                             "(full-size SD 1.5 architecture, random weights; for a GPU). Default: assets/toy-base "
                             "when it exists, else tiny")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=None,
                        help="default: the model's own (UNet sample size x VAE factor: 512 for SD 1.5, 32 for tiny)")
    parser.add_argument("--rank", type=int, default=4, help="rank = alpha on both sides (both scripts default 4)")
    parser.add_argument("--num-class-images", type=int, default=100, help="both scripts' default: 100")
    parser.add_argument("--instance-dir", type=Path, default=TOY_SUBJECT,
                        help="instance photos (center-cropped square and resized to --resolution before timing)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                        help="default: fp16 on cuda, no on cpu")
    parser.add_argument("--report-to", default="tensorboard", choices=["tensorboard", "none"],
                        help="both scripts' default: tensorboard")
    parser.add_argument("--name", default=None,
                        help="results file name (default: whole_run on cpu, whole_run_gpu on cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (interleaved rounds)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up run (0: none)")
    parser.add_argument("--work-dir", type=Path, default=None, help="for the model, images and runs (default: a "
                        "temporary folder, removed afterwards)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if args.device == "cuda" else "no"
    if args.steps < 1 or args.repeats < 1 or (args.resolution or 8) % 8:
        parser.error("--steps and --repeats must be >= 1, --resolution a multiple of 8")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but no GPU is visible")
    # Both trainers take their device from accelerate; the setting is put back afterwards (tests share a process).
    previous = os.environ.get("ACCELERATE_USE_CPU")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        return _main(args)
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = previous


def _main(args) -> list[dict]:
    _import_everything()
    with tempfile.TemporaryDirectory(prefix="whole-run-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        model, model_name = prepare_model(args.model, work)
        args.resolution = args.resolution or native_resolution(model)
        instance_dir, class_dir = prepare_images(args.instance_dir, work, args.resolution, args.num_class_images)
        spec = RunSpec(model=model, instance_dir=str(instance_dir), class_dir=str(class_dir),
                       num_class_images=args.num_class_images,
                       num_instance_images=len(list(instance_dir.iterdir())), resolution=args.resolution,
                       rank=args.rank, steps=args.steps, mixed_precision=args.mixed_precision, report_to=args.report_to)
        samples = time_runs(spec, work, args.repeats, args.warmup_steps)
    rows = build_rows(samples, spec, model_name, args.device)
    name = args.name or ("whole_run" if args.device == "cpu" else "whole_run_gpu")
    write_results(name, rows, _table(rows), _notes(args, spec, model_name, rows), args.out_dir)
    return rows


if __name__ == "__main__":
    main()
