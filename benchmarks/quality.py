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
import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, write_results
from benchmarks.stats import mean_ci, paired_test

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"moslora_kaiming": ("moslora", "kaiming"), "moslora_orthogonal": ("moslora", "orthogonal"),
            "lora": ("lora", "identity")}
BASELINE = "lora"
GEN_SEED = 1234  # generation seed of every evaluation image (the same for every run and the base model)

# The DreamBooth settings of the benchmark (and of scripts/demo.sh): found on the toy base model, see the notes.
DEFAULTS = dict(rank=16, steps=600, learning_rate=3e-3, batch=4, prior_loss_weight=1.0, num_class_images=24,
                train_text_encoder=True, text_encoder_lr=None, target_modules="all", captions="prompt")


@dataclass(frozen=True)
class InstancePrompt:
    prompt: str
    position: str | None  # None: the prompt names no position (not scored)
    background: str | None  # None: the prompt names no background (not scored)


# --- prompts and metrics ---------------------------------------------------------------------------------


def instance_prompts(n: int) -> list[InstancePrompt]:
    """`n` prompts that put the subject in scenes none of its photos shows, in the world's caption grammar.

    Two of every three name a (position, background) pair that no photo has ("a photo of sks star on the left,
    on a gray background"); the third names only a background or only a position ("a photo of sks star, on a
    green background", "a photo of sks star at the top"). Backgrounds are those the subject stands out on.
    """
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT, PHOTOS, SUBJECT_BACKGROUNDS
    from moslora_diffusion.toy.world import POSITIONS

    seen = {(photo[0], photo[2]) for photo in PHOTOS}
    pairs = [(pos, bg) for bg, pos in itertools.product(SUBJECT_BACKGROUNDS, POSITIONS) if (pos, bg) not in seen]
    pairs = pairs[::2] + pairs[1::2]  # a short list still varies both
    partial = [x for pair in itertools.zip_longest([(None, bg) for bg in SUBJECT_BACKGROUNDS],
                                                   [(pos, None) for pos in POSITIONS]) for x in pair if x]
    chosen, full_i, partial_i = [], 0, 0
    for i in range(n):
        if i % 3 == 2:
            chosen.append(partial[partial_i % len(partial)])
            partial_i += 1
        else:
            chosen.append(pairs[full_i % len(pairs)])
            full_i += 1
    prompts = []
    for pos, bg in chosen:
        text = INSTANCE_PROMPT + (f" {POSITIONS[pos][1]}" if pos else "") + (f", on a {bg} background" if bg else "")
        prompts.append(InstancePrompt(text, pos, bg))
    return prompts


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


def mean_pairwise_distance(images) -> float:
    """Mean absolute pixel difference (0..1) over all pairs of images."""
    x = _pixels(images).reshape(len(images), -1)
    pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x))]
    return float(np.mean([np.abs(x[i] - x[j]).mean() for i, j in pairs])) if pairs else 0.0


def instance_metrics(images, prompts: list[InstancePrompt]) -> dict:
    """Subject fidelity and prompt fidelity (only the attributes a prompt names are scored)."""
    from moslora_diffusion.toy.checker import check
    from moslora_diffusion.toy.subject import THRESHOLD, subject_score

    readings = [check(im) for im in images]
    scores = [subject_score(im) for im in images]
    pairs = list(zip(readings, prompts, strict=True))
    bg_ok = [r.background == p.background for r, p in pairs if p.background]
    pos_ok = [r.position == p.position for r, p in pairs if p.position]
    both = [(p.background is None or r.background == p.background) and (p.position is None or r.position == p.position)
            for r, p in pairs]
    return {"subject_rate": float(np.mean([s >= THRESHOLD for s in scores])),
            "subject_score": float(np.mean(scores)),
            "prompt_background": float(np.mean(bg_ok)) if bg_ok else float("nan"),
            "prompt_position": float(np.mean(pos_ok)) if pos_ok else float("nan"),
            "prompt_fidelity": float(np.mean(both))}


def class_prompts(n: int) -> list[str]:
    """The class prompt as is, `n` times, then `n` class prompts with the scenes of the instance prompts ("a photo
    of a star on the left, on a gray background"): a subject that leaks into the class shows in either."""
    from moslora_diffusion.toy.subject import CLASS_PROMPT, INSTANCE_PROMPT

    scenes = [p.prompt.replace(INSTANCE_PROMPT, CLASS_PROMPT) for p in instance_prompts(n)]
    return [CLASS_PROMPT] * n + scenes


def class_metrics(images, base_images) -> dict:
    """Prior preservation against the base model's same-prompt, same-seed images (all class prompts) and
    diversity (the plain class prompt's images: the first half, see `class_prompts`)."""
    from moslora_diffusion.toy.checker import check
    from moslora_diffusion.toy.subject import is_subject

    readings = [check(im) for im in images]
    base_readings = [check(im) for im in base_images]
    pairs = list(zip(readings, base_readings, strict=True))
    same = [(r.colour, r.background, r.position) == (b.colour, b.background, b.position) for r, b in pairs]
    pixel = np.abs(_pixels(images) - _pixels(base_images)).mean(axis=(1, 2, 3))
    plain, plain_readings = images[:len(images) // 2], readings[:len(images) // 2]
    return {"prior_agreement": float(np.mean(same)),
            "prior_background": float(np.mean([r.background == b.background for r, b in pairs])),
            "prior_pixel_distance": float(pixel.mean()),
            "prior_subject_leak": float(np.mean([is_subject(im) for im in images])),
            "diversity_pixel": mean_pairwise_distance(plain),
            "diversity_distinct": float(len({(r.colour, r.background) for r in plain_readings}) / len(plain))}


# name, what it is, which direction is better
METRICS = (
    ("subject_rate", "instance images (subject in unseen scenes) showing the subject (is_subject)", "higher"),
    ("subject_score", "mean subject_score of the instance images", "higher"),
    ("subject_rate_plain", "images of the bare instance prompt (the training caption) showing the subject",
     "higher"),
    ("prompt_fidelity", "instance images with every attribute their prompt names (background, position)", "higher"),
    ("prompt_background", "instance images with their prompt's background (prompts that name one)", "higher"),
    ("prompt_position", "instance images with their prompt's position (prompts that name one)", "higher"),
    ("prior_agreement", "class images read (colour, background, position) as the base model's image for the same "
     "prompt and seed", "higher"),
    ("prior_background", "class images with the background of the base model's same-prompt, same-seed image",
     "higher"),
    ("prior_pixel_distance", "mean |pixel difference| (0..1) of class images to the base model's same-prompt, "
     "same-seed image", "lower"),
    ("prior_subject_leak", "class images (plain and with scenes) that show the subject", "lower"),
    ("diversity_pixel", "mean pairwise |pixel difference| among the plain class prompt's images", "higher"),
    ("diversity_distinct", "distinct (colour, background) readings among the plain class prompt's images / images",
     "higher"),
)
BOUNDS = (0.0, 1.0)  # every metric is a share or a mean of 0..1 values: CIs are clipped to this range


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

    from moslora_diffusion.data.images import IMAGE_EXTENSIONS

    photos = sorted(p for p in Path(src).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not photos:
        raise SystemExit(f"--instance-dir {src}: no images")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for photo in photos:
        if captions == "prompt":
            shutil.copyfile(photo, dst / photo.name)
            continue
        scene = photo_scene(photo.name)
        if scene is None:
            raise SystemExit(f"--captions {captions}: cannot read a scene from {photo.name} (expected "
                             "NN_<position>_<background>.png, as subject.write_photos names them)")
        for k, text in enumerate(scene_captions(*scene, captions)):
            copy = dst / f"{photo.stem}-{k}{photo.suffix}"
            shutil.copyfile(photo, copy)
            copy.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    return dst


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


# --- report -------------------------------------------------------------------------------------------------


def aggregate(runs: list[dict], variants: list[str]) -> dict:
    summary = {}
    for variant in variants:
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        summary[variant] = {m: mean_ci([r[m] for r in mine], bounds=BOUNDS) for m, _, _ in METRICS}
    return summary


def compare(runs: list[dict], variants: list[str]) -> dict:
    """Each MoSLoRA variant vs the LoRA baseline, paired by seed."""
    out = {}
    if BASELINE not in variants:
        return out
    base = {r["seed"]: r for r in runs if r["variant"] == BASELINE}
    for variant in variants:
        if variant == BASELINE:
            continue
        mine = {r["seed"]: r for r in runs if r["variant"] == variant}
        seeds = sorted(set(mine) & set(base))
        out[f"{variant}_vs_{BASELINE}"] = {m: paired_test([mine[s][m] for s in seeds], [base[s][m] for s in seeds])
                                           for m, _, _ in METRICS}
    return out


def _fmt(stats: dict) -> str:
    return f"{stats['mean']:.3f} [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"


def tables(summary: dict, comparisons: dict, base_metrics: dict) -> str:
    variants = list(summary)
    lines = ["| metric | better | base model | " + " | ".join(variants) + " |",
             "|---|---|---:|" + "---:|" * len(variants)]
    for m, _, better in METRICS:
        lines.append(f"| {m} | {better} | {base_metrics[m]:.3f} | "
                     + " | ".join(_fmt(summary[v][m]) for v in variants) + " |")
    if comparisons:
        lines += ["", "Paired differences (variant - lora, same seed), 95% CI, paired t-test:", "",
                  "| metric | " + " | ".join(comparisons) + " |", "|---|" + "---|" * len(comparisons)]
        for m, _, _ in METRICS:
            cells = []
            for comp in comparisons.values():
                c = comp[m]
                p = "n/a" if c["p"] is None else f"{c['p']:.3f}"
                sig = "**significant**" if c["significant"] else "not significant"
                cells.append(f"{c['diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], p={p}, {sig}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(comparisons: dict) -> str:
    parts = []
    for name, comp in comparisons.items():
        sig = [f"{m} ({'better' if (c['diff'] > 0) == (better == 'higher') else 'worse'}, p={c['p']:.3f})"
               for m, _, better in METRICS if (c := comp[m])["significant"]]
        parts.append(f"{name}: " + (", ".join(sig) if sig else "no significant difference on any metric"))
    return "; ".join(parts)


def grid_images(instance: list, classes: list, n: int) -> list:
    """What a grid row shows: 2 images of the bare instance prompt, 4 of instance prompts with scenes, 2 of the
    plain class prompt, 2 of class prompts with scenes (`instance`: n bare, then n with scenes)."""
    return instance[:2] + instance[n:n + 4] + classes[:2] + classes[n:n + 2]


def save_grid(path: Path, rows: list[tuple[str, list]], columns: list[str], scale: int = 2) -> Path:
    """Rows of images under column captions (prompt texts, wrapped), label column on the left."""
    from PIL import Image, ImageDraw

    side, label_w, head_h = 64 * scale, 130, 44
    grid = Image.new("RGB", (label_w + side * len(columns), head_h + side * len(rows)), "white")
    draw_ = ImageDraw.Draw(grid)
    for c, text in enumerate(columns):
        words, line, out = text.split(), "", []
        for w in words:
            if len(line) + len(w) + 1 > side // 6:
                out.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        out.append(line)
        draw_.multiline_text((label_w + c * side + 2, 2), "\n".join(out[-4:]), fill="black", spacing=0)
    for r, (label, images) in enumerate(rows):
        draw_.text((4, head_h + r * side + side // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((side, side), Image.NEAREST), (label_w + c * side, head_h + r * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    return path


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


def describe(settings: dict, result: dict, comparisons: dict) -> str:
    """The notes above the table: what was trained and measured, how to read it, the verdict."""
    st = settings
    encoder = (f"text encoder adapters trained (lr {st['text_encoder_lr'] or st['learning_rate']})"
               if st["train_text_encoder"] else "text encoder frozen")
    captions = {"scene": "each photo captioned with its scene (caption sidecars)",
                "mixed": "each photo 4 times, captioned with its scene, its background, its position and nothing",
                "prompt": "every photo captioned with the instance prompt"}[st["captions"]]
    seeds = st["seed_list"]
    mean_train = np.mean([r["train_seconds"] for r in result["runs"]])
    n = st["n_images"]
    return (
        f"DreamBooth on the toy subject (`{Path(st['instance_dir']).name}`, {captions}) with prior preservation. "
        f"Every variant: rank {st['rank']}, alpha {st['alpha']}, UNet targets `{st['target_modules']}`, "
        f"{encoder}, {st['steps']} steps, learning rate {st['learning_rate']}, batch {st['batch']} "
        f"(+{st['batch']} class images), prior loss weight {st['prior_loss_weight']}, the same "
        f"{st['num_class_images']} class images (generated once from the base model); {len(seeds)} training seeds "
        f"({', '.join(map(str, seeds))}) per variant.\n\n"
        f"Evaluation per run: {n} instance prompts placing the subject in scenes its photos never show "
        f"(2 in 3 name a new (position, background) pair, the rest only a background or only a position), "
        f"{n} bare instance prompts, {n} plain class prompts and {n} class prompts with the instance prompts' "
        f"scenes; {st['gen_steps']} denoising steps with the base model's scheduler, guidance {st['guidance']}, "
        f"generation seed {GEN_SEED} for every run and for the base model. Every image is scored from its pixels "
        "with the toy world's checker and subject score.\n\n"
        "Cells: mean over seeds [95% t confidence interval, clipped to 0..1]; the base-model column is one "
        "evaluation of the untrained model (its prior metrics compare it with itself). Differences: each MoSLoRA "
        "variant minus LoRA on the same seed (same data order, noise and A initialisation), paired t-test, "
        "two-sided, significant when p < 0.05 (no correction for the number of metrics).\n\n"
        + "\n".join(f"- `{m}` ({better} is better): {what}" for m, what, better in METRICS)
        + f"\n\nBase model: `{st['base']}`. Mean training run {mean_train:.0f} s, whole benchmark "
        f"{st['total_seconds']:.0f} s wall (torch threads {st['torch_threads']}{st.get('parts_note', '')}).\n\n"
        f"Verdict: {verdict(comparisons) or 'no LoRA baseline in this run'}.\n\n"
        f"Grid: `{Path(result['grid']).name}` (rows: the base model, then each variant trained with seed 0; "
        "columns: 2 bare instance prompts, 4 instance prompts with scenes, 2 plain class prompts, 2 class prompts with "
        "scenes; same seeds in every row).")


def report(settings: dict, result: dict, out_dir: Path, name: str) -> dict:
    """Summary, paired comparisons and the results files of finished runs."""
    variants = settings["variants"]
    summary = aggregate(result["runs"], variants)
    comparisons = compare(result["runs"], variants)
    notes = describe(settings, result, comparisons)
    rows = [{"kind": "settings", **settings}, {"kind": "base_model", **result["base_metrics"]}]
    rows += [{"kind": "run", **r} for r in result["runs"]]
    rows += [{"kind": "summary", "variant": v, **{m: s for m, s in stats.items()}} for v, stats in summary.items()]
    rows += [{"kind": "comparison", "comparison": c, **tests} for c, tests in comparisons.items()]
    write_results(name, rows, tables(summary, comparisons, result["base_metrics"]), notes, out_dir)
    return {"settings": settings, "summary": summary, "comparisons": comparisons, **result}


def merge_parts(paths: list[Path], out_dir: Path, name: str, grid: Path | None) -> dict:
    """One report from results files of the same settings with disjoint seeds (runs in parallel processes)."""
    parts = [json.loads(Path(p).read_text())["rows"] for p in paths]
    settings = [next(r for r in rows if r["kind"] == "settings") for rows in parts]
    ignored = {"seeds", "seed_list", "seed_start", "total_seconds", "parts_note"}
    for other, path in zip(settings[1:], paths[1:], strict=True):
        differing = sorted(k for k in other if k not in ignored and other[k] != settings[0].get(k))
        if differing:
            raise SystemExit(f"--merge: {path} was run with other settings: {', '.join(differing)}")
    runs = [{k: v for k, v in r.items() if k != "kind"} for rows in parts for r in rows if r["kind"] == "run"]
    seeds = sorted({r["seed"] for r in runs})
    if len(seeds) * len(settings[0]["variants"]) != len(runs):
        raise SystemExit("--merge: the parts share seeds, or a part is incomplete")
    merged = {**settings[0], "seeds": len(seeds), "seed_list": seeds, "seed_start": seeds[0],
              "total_seconds": max(s["total_seconds"] for s in settings),
              "parts_note": f"; {len(paths)} processes side by side, wall time of the longest"}
    base = {k: v for k, v in next(r for r in parts[0] if r["kind"] == "base_model").items() if k != "kind"}
    grid = grid or out_dir / f"{name}_grid.png"
    return report(merged, {"runs": runs, "base_metrics": base, "grid": str(grid)}, out_dir, name)


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
