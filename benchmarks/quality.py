"""DreamBooth quality on the toy world: recipes (the baseline, plain LoRA, one ablation per feature) on a fair split.

Every recipe (benchmarks/quality_recipes.py: a name + TrainConfig overrides on the shared settings) is trained with
our trainer (in-process) on the toy subject (assets/toy-subject, a yellow-and-black striped star) with prior
preservation, once per seed; the shared settings (rank, alpha, targets, steps, learning rate, class images generated
once from the base model) are the same for every recipe. Each trained adapter then draws, per split (validation:
used to choose recipes and settings; test: reported, never used to choose; disjoint scenes, quality_split.py), with
the split's generation seed for every run and for the base model:

- instance prompts that put the subject in the split's scenes, none of which its photos show: a new (position,
  background) pair ("a photo of sks star on the left, on a gray background"), or only a background or a position;
- the bare instance prompt ("a photo of sks star", what the photos are captioned with);
- class prompts: the plain one ("a photo of a star") and the same with the split's scenes.

The toy world's ground truth scores every image from its pixels (moslora_diffusion.toy.checker / subject):

- subject fidelity: share of instance images showing the subject (`is_subject`), mean `subject_score`;
- prompt fidelity: share of instance images whose background / position (checker) are the prompt's;
- prior preservation: agreement of the class images with the base model's image for the same prompt and seed
  (checker colour, background and position; background alone; mean pixel distance), and the share of class
  images that show the subject (leakage);
- diversity of the plain class prompt's images: mean pairwise pixel distance, distinct (colour, background).

Per split and recipe: mean over seeds with a 95% t confidence interval; each recipe vs --reference (baseline): a
paired t-test over seeds (same seed = same data order, noise and adapter A init), significant when p < 0.05; the
issue's targets on the test split (quality_targets.py).

    python -m benchmarks.quality --threads 1          # 8 recipes x 5 seeds on assets/toy-base (hours: split seeds)
    python -m benchmarks.quality --variants baseline min_snr --recipe snr3 snr_gamma=3 --seeds 2
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
from benchmarks.quality_metrics import class_metrics, instance_metrics
from benchmarks.quality_photos import instance_folder
from benchmarks.quality_recipes import (
    BASELINE,
    BUILTIN,
    CAPTIONS,
    DEFAULT_VARIANTS,
    Recipe,
    RecipeError,
    build_recipes,
    check_fields,
    custom_names,
)
from benchmarks.quality_report import grid_images, merge_parts, report, save_grid
from benchmarks.quality_split import SPLIT_GEN_SEEDS, SPLITS, class_prompts, instance_prompts

REPO = Path(__file__).resolve().parents[1]
GRID_SPLIT = "test"  # the grid shows what the report reports

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


def shared_settings(args, class_dir: Path) -> dict:
    """The TrainConfig settings every recipe starts from (the benchmark's flags); photos and seed come per run."""
    from moslora_diffusion.toy.subject import CLASS_PROMPT, INSTANCE_PROMPT

    return dict(
        pretrained_model_name_or_path=str(args.base), instance_prompt=INSTANCE_PROMPT,
        with_prior_preservation=args.prior_loss_weight > 0, class_prompt=CLASS_PROMPT, class_data_dir=str(class_dir),
        num_class_images=args.num_class_images, prior_loss_weight=args.prior_loss_weight, resolution=64,
        adapter="moslora", mixer_init="kaiming", target_modules=args.target_modules, rank=args.rank,
        lora_alpha=float(args.alpha or args.rank), learning_rate=args.learning_rate,
        lr_warmup_steps=min(20, args.steps // 5), lr_scheduler="constant_with_warmup", train_batch_size=args.batch,
        max_train_steps=args.steps, train_text_encoder=args.train_text_encoder, text_encoder_lr=args.text_encoder_lr,
        report_to="none", checkpointing_steps=10**9, logging_steps=25, overwrite_output_dir=True)


def recipe_config(recipe: Recipe, shared: dict, photos: Path, seed: int, output_dir: Path):
    """The TrainConfig of one run: the shared settings, the recipe's overrides, this run's photos, seed and folder."""
    from moslora_diffusion.training import TrainConfig

    return TrainConfig(**{**recipe.settings(shared), "instance_data_dir": str(photos), "seed": seed,
                          "output_dir": str(output_dir)})


def train_run(config) -> float:
    """Trains one adapter in-process; returns the wall time in seconds."""
    from accelerate.state import AcceleratorState, GradientState

    from moslora_diffusion.training import train

    started = time.perf_counter()
    for reset in (lambda: AcceleratorState._reset_state(True), GradientState._reset_state):
        reset()  # accelerate keeps process-wide singletons; every run here is independent
    try:
        train(config)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return time.perf_counter() - started


def draw(pipe, prompts: list[str], args, split: str) -> list:
    from moslora_diffusion.toy.evaluate import generate

    return generate(pipe, prompts, seed=SPLIT_GEN_SEEDS[split], steps=args.gen_steps, guidance=args.guidance)


def evaluate_split(pipe, split: str, args, base_class_images) -> tuple[dict, list, list]:
    """Metrics of one split's prompts (n bare instance prompts, n with the split's scenes, n plain and n scene class
    prompts; None base images: the base model, compared with itself). Returns (metrics, instance images, class
    images)."""
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT, THRESHOLD, subject_score

    n = args.n_images
    prompts = instance_prompts(n, split)
    inst = draw(pipe, [p.prompt for p in prompts], args, split)
    plain = draw(pipe, [INSTANCE_PROMPT] * n, args, split)
    cls = draw(pipe, class_prompts(n, split), args, split)
    metrics = {**instance_metrics(inst, prompts),
               "subject_rate_plain": float(np.mean([subject_score(im) >= THRESHOLD for im in plain])),
               **class_metrics(cls, base_class_images or cls)}
    return metrics, plain + inst, cls


def evaluate_adapter(pipe, adapter_file: Path | None, args, base_class_images: dict | None):
    """Metrics per split of the pipeline with the adapter attached (None: the base model), detached afterwards.
    Returns ({split: metrics}, {split: (instance images, class images)})."""
    import moslora_diffusion as md

    if adapter_file is not None:
        md.load_adapter(pipe, adapter_file)
    metrics, images = {}, {}
    try:
        for split in SPLITS:
            base = base_class_images[split][1] if base_class_images else None
            metrics[split], *images[split] = evaluate_split(pipe, split, args, base)
    finally:
        md.detach_from_pipeline(pipe)
    return metrics, images


def add_recipe_flags(parser) -> None:
    parser.add_argument("--variants", nargs="+", default=None, metavar="RECIPE",
                        help=f"recipes to train (default: {' '.join(DEFAULT_VARIANTS)} and every --recipe); built-in: "
                        + ", ".join(f"{r.name} ({r.about})".replace("%", "%%") for r in BUILTIN.values()))
    parser.add_argument("--recipe", nargs="+", action="append", default=None, metavar="NAME [KEY=VALUE",
                        help="define a recipe: NAME = baseline + these TrainConfig overrides (a built-in NAME: that "
                        "recipe + these), e.g. --recipe snr3 snr_gamma=3; key captions= sets the captions mode; "
                        "repeatable")
    parser.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                        help="TrainConfig overrides on top of every recipe of the run, e.g. --set noise_offset=0.05")
    parser.add_argument("--reference", default=BASELINE, help="the recipe every other one is compared with "
                        "(paired differences per seed)")


def resolve_recipes(parser, args) -> None:
    """args.recipes ({name: Recipe}) and args.variants, checked against TrainConfig before anything is trained."""
    from moslora_diffusion.training.settings.config import TrainConfig
    from moslora_diffusion.training.settings.flags import field_types

    types = field_types(TrainConfig)
    try:
        recipes = build_recipes(args.recipe, args.set, types)
        args.variants = args.variants or [*DEFAULT_VARIANTS, *custom_names(args.recipe)]
        unknown = [v for v in args.variants if v not in recipes]
        if unknown:
            raise RecipeError(f"--variants {unknown[0]}: no such recipe (built-in: {', '.join(BUILTIN)}; or define it "
                              "with --recipe)")
        for name in args.variants:
            check_fields(recipes[name], set(types))
    except RecipeError as err:
        parser.error(str(err))
    if args.reference not in args.variants:
        parser.error(f"--reference {args.reference}: not among --variants ({', '.join(args.variants)})")
    args.recipes = {name: recipes[name] for name in args.variants}
    check_configs(parser, args)


def check_configs(parser, args) -> None:
    """Every recipe's TrainConfig is built once at parse time: a value the trainer refuses (caption_dropout_rate=1.5,
    a trigger word not in the prompt) is one line before the base model loads, not a traceback after other runs."""
    from moslora_diffusion.training.settings.flags import ConfigError

    shared = shared_settings(args, args.work_dir or Path("class-images"))  # no path is read here
    for name, recipe in args.recipes.items():
        try:
            recipe_config(recipe, shared, args.instance_dir, args.seed_start, Path(name))
        except ConfigError as err:
            parser.error(f"recipe {name}: {err}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", type=Path, default=REPO / "assets" / "toy-base", help="toy base model folder")
    parser.add_argument("--instance-dir", type=Path, default=REPO / "assets" / "toy-subject")
    parser.add_argument("--captions", choices=CAPTIONS, default=DEFAULTS["captions"],
                        help="scene: each photo captioned with its scene ('a photo of sks star on the left, on a green "
                        "background', caption sidecars); mixed: each photo 4 times, captioned with its scene, only its "
                        "background, only its position, and the bare instance prompt; prompt: every photo captioned "
                        "with the bare instance prompt (a recipe may set its own: captions=...)")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per variant (seed-start .. +N-1)")
    parser.add_argument("--seed-start", type=int, default=0, help="first training seed (to split seeds over "
                        "processes, then --merge their results)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="train nothing: one report from results files of the same settings with disjoint "
                        "seeds (written to --out-dir/--name)")
    add_recipe_flags(parser)
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
    parser.add_argument("--n-images", type=int, default=16, help="images per prompt kind and split: per run 2 splits "
                        "x (bare instance, scene instance, plain class, scene class) x N")
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
    resolve_recipes(parser, args)
    return args


def photos_for(args, recipe: Recipe, work: Path) -> Path:
    """The run folder of the photos in the recipe's captions mode (with masks for a masked-loss recipe), made once."""
    captions = recipe.captions or args.captions
    masks = bool(recipe.overrides.get("masked_loss"))
    folder = work / f"photos-{captions}{'-masked' if masks else ''}"
    return folder if folder.is_dir() else instance_folder(args.instance_dir, folder, captions, masks)


def run(args, work: Path) -> dict:
    pipe = load_pipe(args.base)
    class_dir = prepare_class_images(pipe, work / "class-images", args.num_class_images, args.gen_steps,
                                     args.guidance)
    shared = shared_settings(args, class_dir)
    photos = {name: photos_for(args, recipe, work) for name, recipe in args.recipes.items()}
    base_metrics, base_images = evaluate_adapter(pipe, None, args, None)
    grid_rows = [("base model", grid_images(*base_images[GRID_SPLIT], args.n_images))]
    runs = []
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        for name, recipe in args.recipes.items():
            out = work / f"{name}-seed{seed}"
            seconds = train_run(recipe_config(recipe, shared, photos[name], seed, out))
            metrics, images = evaluate_adapter(pipe, out / "moslora.safetensors", args, base_images)
            runs.append({"variant": name, "seed": seed, "train_seconds": round(seconds, 1), **metrics})
            print(json.dumps(runs[-1]), flush=True)
            if seed == args.seed_start:
                grid_rows.append((name, grid_images(*images[GRID_SPLIT], args.n_images)))
    grid = save_grid(args.grid or args.out_dir / f"{args.name}_grid.png", grid_rows, grid_columns(args.n_images))
    recipes = {name: recipe.describe(shared) for name, recipe in args.recipes.items()}
    return {"runs": runs, "base_metrics": base_metrics, "grid": str(grid), "recipes": recipes}


def grid_columns(n: int) -> list[str]:
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT

    prompts = grid_images([INSTANCE_PROMPT] * n + [p.prompt for p in instance_prompts(n, GRID_SPLIT)],
                          class_prompts(n, GRID_SPLIT), n)
    return [p.replace("a photo of ", "") for p in prompts]


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
                "recipes": result.pop("recipes"), "reference": args.reference, "steps": args.steps, "rank": args.rank,
                "alpha": args.alpha or args.rank, "target_modules": args.target_modules,
                "learning_rate": args.learning_rate, "batch": args.batch, "prior_loss_weight": args.prior_loss_weight,
                "num_class_images": args.num_class_images, "train_text_encoder": args.train_text_encoder,
                "text_encoder_lr": args.text_encoder_lr, "n_images": args.n_images, "gen_steps": args.gen_steps,
                "guidance": args.guidance, "generation_seeds": SPLIT_GEN_SEEDS,
                "torch_threads": torch.get_num_threads(),
                "total_seconds": round(time.perf_counter() - started, 1)}
    return report(settings, result, args.out_dir, args.name)


if __name__ == "__main__":
    main()
