"""DreamBooth quality on the toy world: MoSLoRA (kaiming / orthogonal mixer) vs LoRA at equal rank and steps.

Every variant is trained with our trainer (in-process) on the toy subject (assets/toy-subject, a yellow-and-black
striped star) with prior preservation, once per seed, with the same rank, alpha, targets, steps, learning rate and
class images (generated once from the base model and shared by every run). Each trained adapter then draws, with
generation seeds that are the same for every run and for the base model:

- instance prompts that put the subject in scenes none of its photos shows: a new (position, background) pair
  ("a photo of sks star on the left, on a gray background"), or only a background or a position;
- the bare instance prompt ("a photo of sks star", what the photos are captioned with);
- class prompts: the plain one ("a photo of a star") and the same with the instance prompts' scenes.

The toy world's ground truth scores every image from its pixels (moslora_diffusion.toy.checker / subject):

- subject fidelity: share of instance images showing the subject (`is_subject`), mean `subject_score`;
- prompt fidelity: share of instance images whose background / position (checker) are the prompt's;
- prior preservation: agreement of the class images with the base model's image for the same prompt and seed
  (checker colour, background and position; background alone; mean pixel distance), and the share of class
  images that show the subject (leakage);
- diversity of the plain class prompt's images: mean pairwise pixel distance, distinct (colour, background).

Per variant: mean over seeds with a 95% t confidence interval; each MoSLoRA variant vs LoRA: a paired t-test
over seeds (same seed = same data order, noise and adapter A init), significant when p < 0.05.

    python -m benchmarks.quality --threads 1          # 3 variants x 5 seeds on assets/toy-base (about an hour)
    python -m benchmarks.quality --seeds 2 --steps 20 --n-images 4 --out-dir /tmp/q   # smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR
from benchmarks.quality_metrics import GEN_SEED, class_metrics, class_prompts, instance_metrics, instance_prompts
from benchmarks.quality_report import grid_images, merge_parts, report, save_grid

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"moslora_kaiming": ("moslora", "kaiming"), "moslora_orthogonal": ("moslora", "orthogonal"),
            "lora": ("lora", "identity")}

# The DreamBooth settings of the benchmark (and of scripts/demo.sh): found on the toy base model, see the notes.
DEFAULTS = dict(rank=16, steps=600, learning_rate=3e-3, batch=4, prior_loss_weight=1.0, num_class_images=24,
                train_text_encoder=True, text_encoder_lr=None, target_modules="all", captions="prompt")


# --- training and generation -------------------------------------------------------------------------------


def load_pipe(base: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prepare_class_images(pipe, folder: Path, n: int, steps: int, guidance: float) -> Path:
    """`n` class-prompt images from the base model (seed 0), shared by every run; kept if already there."""
    from moslora_diffusion.toy.evaluate import generate
    from moslora_diffusion.toy.subject import CLASS_PROMPT

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) < n:
        for i, image in enumerate(generate(pipe, [CLASS_PROMPT] * n, seed=0, steps=steps, guidance=guidance)):
            image.save(folder / f"class_{i:04d}.png")
    return folder


def photo_scene(name: str) -> tuple[str, str] | None:
    """(position, background) of a subject photo named `NN_<position>_<background>.png` (as subject.write_photos
    names them), else None."""
    from moslora_diffusion.toy.world import BACKGROUND_COLOURS, POSITIONS

    parts = Path(name).stem.split("_")
    if len(parts) != 3 or parts[1] not in POSITIONS or parts[2] not in BACKGROUND_COLOURS:
        return None
    return parts[1], parts[2]


def scene_captions(position: str, background: str, mode: str) -> list[str]:
    """The training captions of one photo: "scene" its full scene; "mixed" also the scene with only the
    background, only the position, and none of it (the photo is repeated once per caption)."""
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT
    from moslora_diffusion.toy.world import POSITIONS

    where, on = f" {POSITIONS[position][1]}", f", on a {background} background"
    full = [INSTANCE_PROMPT + where + on]
    return full if mode == "scene" else full + [INSTANCE_PROMPT + on, INSTANCE_PROMPT + where, INSTANCE_PROMPT]


def instance_folder(src: Path, dst: Path, captions: str) -> Path:
    """The subject photos for training, copied to `dst` with caption sidecars (see `scene_captions`; the scene of
    each photo is read from its file name), or bare (`captions="prompt"`: every photo gets the instance prompt)."""
    import shutil

    from moslora_diffusion.data import find_photos

    photos = [p.path for p in find_photos(src).photos]  # not the `<name>_mask.png` files beside them
    if not photos:
        raise SystemExit(f"--instance-dir {src}: no images")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for photo in photos:
        if captions == "prompt":
            _copy_with_mask(photo, dst / photo.name)
            continue
        scene = photo_scene(photo.name)
        if scene is None:
            raise SystemExit(f"--captions {captions}: cannot read a scene from {photo.name} (expected "
                             "NN_<position>_<background>.png, as subject.write_photos names them)")
        for k, text in enumerate(scene_captions(*scene, captions)):
            copy = _copy_with_mask(photo, dst / f"{photo.stem}-{k}{photo.suffix}")
            copy.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    return dst


def _copy_with_mask(photo: Path, copy: Path) -> Path:
    """Copies `photo` to `copy`, and its mask file, if any, beside it as `<copy stem>_mask.*` (for --masked_loss)."""
    import shutil

    from moslora_diffusion.data import mask_file

    shutil.copyfile(photo, copy)
    if (mask := mask_file(photo)) is not None:
        shutil.copyfile(mask, copy.with_name(f"{copy.stem}_mask{mask.suffix}"))
    return copy


def train_variant(args, variant: str, seed: int, photos: Path, class_dir: Path, output_dir: Path) -> float:
    """Trains one adapter in-process; returns the wall time in seconds."""
    from accelerate.state import AcceleratorState, GradientState

    from moslora_diffusion.toy.subject import CLASS_PROMPT, INSTANCE_PROMPT
    from moslora_diffusion.training import TrainConfig, train

    kind, mixer_init = VARIANTS[variant]
    config = TrainConfig(
        pretrained_model_name_or_path=str(args.base), instance_data_dir=str(photos),
        instance_prompt=INSTANCE_PROMPT, with_prior_preservation=args.prior_loss_weight > 0, class_prompt=CLASS_PROMPT,
        class_data_dir=str(class_dir), num_class_images=args.num_class_images,
        prior_loss_weight=args.prior_loss_weight, resolution=64, adapter=kind, mixer_init=mixer_init,
        target_modules=args.target_modules,
        rank=args.rank, lora_alpha=float(args.alpha or args.rank), learning_rate=args.learning_rate,
        lr_warmup_steps=min(20, args.steps // 5), lr_scheduler="constant_with_warmup",
        train_batch_size=args.batch, max_train_steps=args.steps, train_text_encoder=args.train_text_encoder,
        text_encoder_lr=args.text_encoder_lr,
        seed=seed, output_dir=str(output_dir), overwrite_output_dir=True, report_to="none",
        checkpointing_steps=10**9, logging_steps=25)
    started = time.perf_counter()
    for reset in (lambda: AcceleratorState._reset_state(True), GradientState._reset_state):
        reset()  # accelerate keeps process-wide singletons; every run here is independent
    try:
        train(config)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return time.perf_counter() - started


def draw(pipe, prompts: list[str], args) -> list:
    from moslora_diffusion.toy.evaluate import generate

    return generate(pipe, prompts, seed=GEN_SEED, steps=args.gen_steps, guidance=args.guidance)


def evaluate_adapter(pipe, adapter_file: Path | None, args, base_class_images) -> tuple[dict, list, list]:
    """Metrics of the pipeline with the adapter attached (None: the base model, compared with itself); the
    adapter is detached afterwards. Returns (metrics, instance images, class images)."""
    import moslora_diffusion as md
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT, THRESHOLD, subject_score

    if adapter_file is not None:
        md.load_adapter(pipe, adapter_file)
    try:
        prompts = instance_prompts(args.n_images)
        inst = draw(pipe, [p.prompt for p in prompts], args)
        plain = draw(pipe, [INSTANCE_PROMPT] * args.n_images, args)
        cls = draw(pipe, class_prompts(args.n_images), args)
    finally:
        md.detach_from_pipeline(pipe)
    metrics = {**instance_metrics(inst, prompts),
               "subject_rate_plain": float(np.mean([subject_score(im) >= THRESHOLD for im in plain])),
               **class_metrics(cls, base_class_images or cls)}
    return metrics, plain + inst, cls


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", type=Path, default=REPO / "assets" / "toy-base", help="toy base model folder")
    parser.add_argument("--instance-dir", type=Path, default=REPO / "assets" / "toy-subject")
    parser.add_argument("--captions", choices=["mixed", "scene", "prompt"], default=DEFAULTS["captions"],
                        help="scene: each photo captioned with its scene ('a photo of sks star on the left, on a green "
                        "background', caption sidecars); mixed: each photo 4 times, captioned with its scene, only its "
                        "background, only its position, and the bare instance prompt; prompt: every photo captioned "
                        "with the bare instance prompt")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per variant (seed-start .. +N-1)")
    parser.add_argument("--seed-start", type=int, default=0, help="first training seed (to split seeds over "
                        "processes, then --merge their results)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="train nothing: one report from results files of the same settings with disjoint "
                        "seeds (written to --out-dir/--name)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps of every run")
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    parser.add_argument("--target-modules", default=DEFAULTS["target_modules"],
                        help="UNet adapter targets: a preset (attn, attn+proj, attn+ff, all) or module names")
    parser.add_argument("--alpha", type=float, default=None, help="adapter alpha (default: the rank)")
    parser.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="instance images per step "
                        "(plus as many class images)")
    parser.add_argument("--prior-loss-weight", type=float, default=DEFAULTS["prior_loss_weight"])
    parser.add_argument("--num-class-images", type=int, default=DEFAULTS["num_class_images"])
    parser.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction,
                        default=DEFAULTS["train_text_encoder"])
    parser.add_argument("--text-encoder-lr", type=float, default=DEFAULTS["text_encoder_lr"],
                        help="learning rate of the text-encoder adapters (default: --learning-rate)")
    parser.add_argument("--n-images", type=int, default=24, help="instance images and class images per run")
    parser.add_argument("--gen-steps", type=int, default=25, help="denoising steps per evaluation image")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="quality", help="results file name (<out-dir>/<name>.md/.json)")
    parser.add_argument("--grid", type=Path, default=None, help="image grid PNG (default: <out-dir>/<name>_grid.png)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep class images and adapters here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.merge:
        return args
    if not (args.base / "model_index.json").is_file():
        parser.error(f"--base {args.base}: not a diffusers folder (train the toy base model first)")
    if args.seeds < 1 or args.n_images < 2:
        parser.error("--seeds must be >= 1 and --n-images >= 2")
    return args


def run(args, work: Path) -> dict:
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT

    pipe = load_pipe(args.base)
    photos = instance_folder(args.instance_dir, work / "photos", args.captions)
    class_dir = prepare_class_images(pipe, work / "class-images", args.num_class_images, args.gen_steps,
                                     args.guidance)
    base_metrics, base_inst, base_cls = evaluate_adapter(pipe, None, args, None)
    grid_rows = [("base model", grid_images(base_inst, base_cls, args.n_images))]
    runs = []
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        for variant in args.variants:
            out = work / f"{variant}-seed{seed}"
            seconds = train_variant(args, variant, seed, photos, class_dir, out)
            metrics, inst, cls = evaluate_adapter(pipe, out / "moslora.safetensors", args, base_cls)
            runs.append({"variant": variant, "seed": seed, "train_seconds": round(seconds, 1), **metrics})
            print(json.dumps(runs[-1]), flush=True)
            if seed == 0:
                grid_rows.append((variant, grid_images(inst, cls, args.n_images)))
    prompts = grid_images([INSTANCE_PROMPT] * args.n_images + [p.prompt for p in instance_prompts(args.n_images)],
                          class_prompts(args.n_images), args.n_images)
    grid = save_grid(args.grid or args.out_dir / f"{args.name}_grid.png", grid_rows,
                     [p.replace("a photo of ", "") for p in prompts])
    return {"runs": runs, "base_metrics": base_metrics, "grid": str(grid)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge_parts(args.merge, args.out_dir, args.name, args.grid)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.work_dir:
        result = run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="quality-bench-") as tmp:
            result = run(args, Path(tmp))
    settings = {"base": str(args.base), "instance_dir": str(args.instance_dir), "captions": args.captions,
                "seeds": args.seeds, "seed_start": args.seed_start,
                "seed_list": list(range(args.seed_start, args.seed_start + args.seeds)), "variants": args.variants,
                "steps": args.steps, "rank": args.rank, "alpha": args.alpha or args.rank,
                "target_modules": args.target_modules, "learning_rate": args.learning_rate, "batch": args.batch,
                "prior_loss_weight": args.prior_loss_weight, "num_class_images": args.num_class_images,
                "train_text_encoder": args.train_text_encoder, "text_encoder_lr": args.text_encoder_lr,
                "n_images": args.n_images, "gen_steps": args.gen_steps, "guidance": args.guidance,
                "generation_seed": GEN_SEED, "torch_threads": torch.get_num_threads(),
                "total_seconds": round(time.perf_counter() - started, 1)}
    return report(settings, result, args.out_dir, args.name)


if __name__ == "__main__":
    main()
