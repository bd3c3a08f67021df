"""A whole DreamBooth run timed as a user starts it: each run its own fresh process, measured from outside.

For every run: whole-process wall time (start to exit, imports included), user and system CPU time, peak RSS
and minor / major page faults (os.wait4's rusage of the child), and /proc/loadavg read just before it starts.
Rounds are interleaved (the order rotates every round); ratios are medians of per-round ratios.

Variants (all the same settings: model, images, rank = alpha, lr, batch, resolution, fp32, seed, steps):
- peer: diffusers' `examples/dreambooth/train_dreambooth_lora.py`, unmodified, when --peer-script names it
  (default: benchmarks/peer/train_dreambooth_lora.py, not part of the repository). To get it: that file from
  the diffusers repository at the tag of the installed diffusers (v0.42.1 here:
  https://github.com/huggingface/diffusers/blob/v0.42.1/examples/dreambooth/train_dreambooth_lora.py), and
  torchvision (the script imports its transforms), the release built for the installed torch. Without it the
  peer is the in-repo re-implementation, `python -m benchmarks.dreambooth_peer` (the same per-step work;
  benchmarks/dreambooth_peer.py), and the result says so.
- ours / ours_rerun: `python train_dreambooth.py` with its default flags (the allocator settings of
  moslora_diffusion/console/allocator.py applied, as every command does). `ours` starts from an empty latent
  cache (first run); `ours_rerun` finds an earlier, untimed run's VAE posteriors in it (training again with
  another learning rate, rank or step count).
- today / today_rerun: the same with MOSLORA_MALLOC=default, glibc's default allocator settings: what the
  commands did before the allocator settings (the peak RSS and kernel time to compare with).
Class images are in the class folder before anything runs (no trainer generates any).

    python -m benchmarks.fresh_process                                       # the recorded figure (~25 min)
    python -m benchmarks.fresh_process --model tiny --steps 2 --rounds 1 --num-class-images 2   # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, write_results
from benchmarks.dreambooth_peer import CLASS_PROMPT, INSTANCE_PROMPT

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER_SCRIPT = REPO / "benchmarks" / "peer" / "train_dreambooth_lora.py"
VARIANTS = ("peer", "ours", "ours_rerun", "today", "today_rerun")
METRICS = ("wall_s", "user_s", "sys_s", "max_rss_mib", "minor_faults", "major_faults")


def run_process(argv: list[str], env: dict[str, str]) -> dict:
    """Runs argv as a fresh process (output discarded); its wall, CPU time, peak RSS and page faults."""
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()  # drained while it runs (a full pipe would block the child)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {proc.returncode}: {stderr.decode()[-2000:]}")
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "max_rss_mib": usage.ru_maxrss / 1024, "minor_faults": usage.ru_minflt, "major_faults": usage.ru_majflt,
            "loadavg_before": [float(x) for x in load]}


def adapter_digest(output_dir: Path) -> str:
    """SHA-256 over the trained adapter's tensors (names, dtypes, shapes, bytes; file metadata left out)."""
    import hashlib

    from safetensors.torch import load_file

    files = sorted(output_dir.glob("*.safetensors"))
    path = next((f for f in files if f.name in ("moslora.safetensors", "pytorch_lora_weights.safetensors")), None)
    if path is None:
        raise RuntimeError(f"no adapter in {output_dir}")
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(path).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def common_flags(args, work: Path, output_dir: Path) -> list[str]:
    """The flags both trainers take alike (same names in train_dreambooth.py and the diffusers script)."""
    return ["--pretrained_model_name_or_path", str(work / "model"), "--instance_data_dir", str(work / "instance"),
            "--instance_prompt", INSTANCE_PROMPT, "--with_prior_preservation", "--class_data_dir",
            str(work / "class"), "--class_prompt", CLASS_PROMPT, "--num_class_images", str(args.num_class_images),
            "--resolution", str(args.resolution), "--rank", str(args.rank), "--learning_rate", "1e-4",
            "--max_train_steps", str(args.steps), "--train_batch_size", "1", "--seed", "0",
            "--mixed_precision", "no", "--output_dir", str(output_dir)]


def variant_command(variant: str, args, work: Path, output_dir: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of one run of `variant`."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    env.pop("MOSLORA_MALLOC", None)
    flags = common_flags(args, work, output_dir)
    if variant == "peer":
        peer = [str(args.peer_script)] if args.peer_script.is_file() else ["-m", "benchmarks.dreambooth_peer"]
        return [sys.executable, *peer, *flags], env
    if variant.startswith("today"):
        env["MOSLORA_MALLOC"] = "default"
    cache = work / "latent-cache-earlier" if variant.endswith("_rerun") else output_dir / "latent-cache"
    return [sys.executable, str(REPO / "train_dreambooth.py"), *flags, "--lora_alpha", str(args.rank),
            "--latent_cache_dir", str(cache)], env


def prepare(args, work: Path) -> str:
    """The model and images on disk, and an earlier run of ours filling the rerun cache; the model's name."""
    from benchmarks.whole_run import prepare_images, prepare_model

    if args.model_dir is not None:
        (work / "model").symlink_to(args.model_dir.resolve(), target_is_directory=True)
        model_name = f"{args.model} ({args.model_dir})"
    else:
        _, model_name = prepare_model(args.model, work)
    prepare_images(REPO / "assets" / "toy-subject", work, args.resolution, args.num_class_images)
    argv, env = variant_command("ours_rerun", args, work, work / "runs" / "earlier")
    run_process(argv, env)
    shutil.rmtree(work / "runs" / "earlier")
    return model_name


def time_rounds(args, work: Path) -> dict[str, list[dict]]:
    samples = {v: [] for v in args.variants}
    for round_index in range(args.rounds):
        shift = round_index % len(args.variants)
        for variant in args.variants[shift:] + args.variants[:shift]:
            out = work / "runs" / f"{variant}-{round_index}"
            argv, env = variant_command(variant, args, work, out)
            samples[variant].append(run_process(argv, env) | {"adapter_sha256": adapter_digest(out)})
            shutil.rmtree(out)
            print(f"round {round_index} {variant}: {samples[variant][-1]}", flush=True)
    return samples


def merged_rounds(paths: list[Path]) -> tuple[dict[str, list[dict]], str, str]:
    """Every variant's runs from earlier results (rounds appended in order), the model and the peer named there."""
    import json

    samples: dict[str, list[dict]] = {}
    for path in paths:
        saved = json.loads(path.read_text())
        for row in saved["rows"]:
            samples.setdefault(row["variant"], []).extend(row["runs"])
    first = json.loads(paths[0].read_text())
    model = first["rows"][0].get("model") or "full-size SD 1.5 architecture (random weights, fp32 on disk)"
    return samples, model, next(r["peer"] for r in first["rows"] if r["peer"])


def _paired(samples, name: str, base: str, key: str) -> float:
    return statistics.median(a[key] / b[key] for a, b in zip(samples[name], samples[base], strict=True))


def build_rows(samples: dict[str, list[dict]], peer_name: str) -> list[dict]:
    rows = []
    for variant, runs in samples.items():
        row = {"variant": variant, "peer": peer_name if variant == "peer" else None}
        for key in METRICS:
            row[key] = round(statistics.median(r[key] for r in runs), 3)
        row["wall_min_s"], row["wall_max_s"] = round(min(r["wall_s"] for r in runs), 2), round(
            max(r["wall_s"] for r in runs), 2)
        if variant != "peer" and "peer" in samples:  # the least disturbed run of each: a cross-check on a busy machine
            row["min_wall_ratio_vs_peer"] = round(row["wall_min_s"] / min(r["wall_s"] for r in samples["peer"]), 3)
        row["sys_share_of_wall"] = round(statistics.median(r["sys_s"] / r["wall_s"] for r in runs), 3)
        if variant != "peer" and "peer" in samples:
            row["wall_ratio_vs_peer"] = round(_paired(samples, variant, "peer", "wall_s"), 3)
        base = {"ours": "today", "ours_rerun": "today_rerun"}.get(variant)
        if base in samples:
            row["wall_ratio_vs_today"] = round(_paired(samples, variant, base, "wall_s"), 3)
            row["rss_ratio_vs_today"] = round(_paired(samples, variant, base, "max_rss_mib"), 3)
        row["runs"] = runs
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| variant | wall s (median) | min-max s | user s | sys s | sys / wall | peak RSS MiB | minor faults "
             "| major faults | wall / peer | min / min peer | wall / today | RSS / today |", "|---|" + "---:|" * 12]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['wall_s']:.1f} | {r['wall_min_s']:.1f}-{r['wall_max_s']:.1f} "
                     f"| {r['user_s']:.1f} | {r['sys_s']:.1f} | {r['sys_share_of_wall']:.3f} | {r['max_rss_mib']:.0f} "
                     f"| {r['minor_faults']:,.0f} | {r['major_faults']:,.0f} | "
                     + " | ".join(str(r.get(k, "")) for k in ("wall_ratio_vs_peer", "min_wall_ratio_vs_peer",
                                                              "wall_ratio_vs_today", "rss_ratio_vs_today")) + " |")
    return "\n".join(lines)


def _notes(args, model_name: str, peer_name: str, rows: list[dict]) -> str:
    by = {r["variant"]: r for r in rows}
    loads = [r["loadavg_before"][0] for row in rows for r in row["runs"]]
    result = []
    for name, target in (("ours", 0.65), ("ours_rerun", 0.55)):
        if name in by and "wall_ratio_vs_peer" in by[name]:
            result.append(f"{name} / peer = {by[name]['wall_ratio_vs_peer']:.3f} (target <= {target})")
    for name in ("ours", "ours_rerun"):
        if name in by:
            result.append(f"{name} system time = {100 * by[name]['sys_share_of_wall']:.1f}% of wall (target <= 10%)")
    for name, base in (("ours", "today"), ("ours_rerun", "today_rerun")):
        if name in by and base in by:
            digests = {r["adapter_sha256"] for r in by[name]["runs"] + by[base]["runs"]}
            result.append(f"{name} vs {base} adapters: " + ("bit-identical (one SHA-256 over every run's tensors)"
                                                            if len(digests) == 1 else f"{len(digests)} different"))
    return "\n".join([
        f"Whole DreamBooth run with prior preservation, each run a fresh process: {args.steps} steps, batch 1 "
        f"(+ 1 class row), {args.resolution} px, rank {args.rank} = alpha, lr 1e-4, seed 0, fp32, "
        f"{args.num_class_images} class images (already in the class folder), {args.threads} threads "
        f"(OMP_NUM_THREADS), CPU, report_to tensorboard (both scripts' default).",
        "",
        f"- Model: {model_name}. Instance photos: assets/toy-subject, resized to {args.resolution} px.",
        f"- Peer: {peer_name}.",
        "- Wall: the child process from start to exit (imports, loading, steps, saving); user / sys / peak RSS / "
        "faults: os.wait4's rusage of the child. `today*`: MOSLORA_MALLOC=default (glibc's defaults, the commands "
        "before the allocator settings). `*_rerun`: an earlier run's VAE posteriors in the latent cache.",
        f"- {args.rounds} interleaved rounds (order rotated every round); medians; ratios are medians of per-round "
        f"ratios. 1-minute load average before the runs: {min(loads):.2f} to {max(loads):.2f} (each run's in the "
        "json).",
        "",
        "Result: " + "; ".join(result) + ".",
    ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--model", default="full-sd15", choices=["full-sd15", "tiny"],
                        help="full-sd15: the SD 1.5 architecture with random weights (models/full_size.py)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a diffusers folder already saved for --model (skips building it)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-class-images", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--peer-script", type=Path, default=DEFAULT_PEER_SCRIPT,
                        help="diffusers' train_dreambooth_lora.py (default: benchmarks/peer/, when present)")
    parser.add_argument("--name", default="fresh_process")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="run nothing: the rounds recorded in these json files (same settings) in one result")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.resolution % 8:
        parser.error("--steps and --rounds must be >= 1, --resolution a multiple of 8")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    peer_name = (f"diffusers {args.peer_script} (unmodified)" if args.peer_script.is_file() else
                 "the in-repo re-implementation of diffusers' train_dreambooth_lora.py (python -m "
                 "benchmarks.dreambooth_peer): the diffusers script is not here (it imports torchvision, which "
                 "has no CPU build installed)")
    if args.merge:
        samples, model_name, peer_name = merged_rounds(args.merge)
        args.rounds = min(len(runs) for runs in samples.values())
    else:
        with tempfile.TemporaryDirectory(prefix="fresh-process-", dir=args.work_dir) as tmp:
            work = Path(tmp)
            model_name = prepare(args, work)
            samples = time_rounds(args, work)
    rows = [row | {"model": model_name} for row in build_rows(samples, peer_name)]
    write_results(args.name, rows, _table(rows), _notes(args, model_name, peer_name, rows), args.out_dir)
    return rows


if __name__ == "__main__":
    main()
