"""Load on the running web app: N concurrent `generate` (or MoLE `compose`) requests through its API, all
queued, none lost; with --mode mole also the latency of one MoLE generation against one base generation.

Starts the app (tiny model by default) on 127.0.0.1 in a subprocess unless --url names a running one,
fires --requests generate calls at once from --concurrency threads through gradio_client, and records
the total time, per-request latency and the app's own generation count (which must grow by exactly N).

    python -m benchmarks.app_load                       # 20 requests, writes benchmarks/results/app_load.{md,json}
    python -m benchmarks.app_load --url http://127.0.0.1:7860 --requests 50
    python -m benchmarks.app_load --mode mole           # 3 toy experts and a MoLE file -> results/app_load_mole.*
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, TimeoutError, as_completed
from pathlib import Path

from benchmarks.common import RESULTS_DIR, write_results

ROOT = Path(__file__).resolve().parents[1]
SLOTS = 8  # adapter slider slots of the Generate tab (moslora_diffusion.app.ui_common.MAX_SLOTS)
EXPERT_SLOTS = 8  # expert slots of the Compose tab (moslora_diffusion.mole.MAX_EXPERTS)
MOLE_MODE = "MoLE (learned gates)"  # the Compose tab's label of the mode (moslora_diffusion.app.compose.MODES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(args: list[str], log_path: Path, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """`python app.py <args>` on a free port of 127.0.0.1; returns once it answers HTTP."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                              "1")}
    log = open(log_path, "wb")  # noqa: SIM115 - stays open for the server's lifetime
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *args, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_app(proc)
    raise TimeoutError(f"the app did not answer within {timeout_s:.0f} s; see {log_path}")


def stop_app(proc: subprocess.Popen) -> None:
    """Terminates the app's process group (only the one we started)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _generate_args(i: int, size: int, steps: int) -> list:
    # prompt, negative, seed, steps, CFG, width, height, images, sampler, compare, then one scale per slot
    return [f"a photo of sks dog, request {i}", "", i, steps, 5.0, size, size, 1, "DDIM", False] + [0.8] * SLOTS


def _compose_args(i: int, size: int, steps: int, mole: str) -> list:
    # the generate fields, mode, MoLE file, each expert's extra scale and mask box, then the sum sliders
    return ([f"a photo of sks dog, request {i}", "", i, steps, 5.0, size, size, "DDIM", MOLE_MODE, mole]
            + [1.0] * EXPERT_SLOTS + [False] * EXPERT_SLOTS + [0.8] * SLOTS)


def request_once(client, i: int, size: int, steps: int, mole: str | None = None, base: bool = False) -> float:
    """One request through the API (MoLE when `mole` names a loaded MoLE file; sliders at 0 when `base`);
    its latency in seconds. RuntimeError unless exactly the asked image came back."""
    start = time.perf_counter()
    if mole:
        gallery, infotext, _, message, _ = client.predict(*_compose_args(i, size, steps, mole), api_name="/compose")
        expected = f"MoLE: {mole}"
    else:
        args = _generate_args(i, size, steps)
        args[-SLOTS:] = [0.0 if base else 0.8] * SLOTS
        gallery, infotext, message, _ = client.predict(*args, api_name="/generate")
        expected = f"Seed: {i},"
    if message or len(gallery) != 1 or f"Seed: {i}," not in infotext or expected not in infotext:
        raise RuntimeError(message or f"unexpected result {gallery!r}")
    return time.perf_counter() - start


def mole_vs_base(url: str, mole: str, size: int, steps: int, repeats: int) -> dict:
    """Median latency of one MoLE generation and one base generation (adapter sliders at 0), sent one at a time
    and interleaved through the app's API, so both pay the same queue and transfer overheads."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    request_once(client, 0, size, steps, mole)  # warm-up of both paths
    request_once(client, 0, size, steps, base=True)
    mole_s, base_s = [], []
    for i in range(repeats):
        mole_s.append(request_once(client, i, size, steps, mole))
        base_s.append(request_once(client, i, size, steps, base=True))
    ratios = [m / b for m, b in zip(mole_s, base_s, strict=True)]
    return {"mole_median_s": round(statistics.median(mole_s), 3), "base_median_s": round(statistics.median(base_s), 3),
            "mole_over_base": round(statistics.median(ratios), 3), "latency_repeats": repeats}


def run_load(url: str, requests: int, concurrency: int, size: int, steps: int, timeout_s: float,
             mole: str | None = None) -> dict:
    """Fires the requests at once (MoLE ones when `mole` names a loaded MoLE file); counts completions,
    failures and requests still pending at the deadline."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    before = client.predict(api_name="/status")["generations"]
    latencies, failures = [], []

    def one(i: int) -> float:
        return request_once(client, i, size, steps, mole)

    start = time.perf_counter()
    pool = ThreadPoolExecutor(concurrency)
    futures = [pool.submit(one, i) for i in range(requests)]
    try:
        for future in as_completed(futures, timeout=timeout_s):
            try:
                latencies.append(future.result())
            except Exception as err:  # a failed request is counted and reported, not fatal
                failures.append(str(err))
    except TimeoutError:
        pass
    total = time.perf_counter() - start
    pool.shutdown(wait=False, cancel_futures=True)
    after = client.predict(api_name="/status")  # the app still answers
    return {"requests": requests, "concurrency": concurrency, "completed": len(latencies), "failed": len(failures),
            "lost": requests - len(latencies) - len(failures), "errors": failures[:5], "total_s": round(total, 2),
            "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_max_s": round(max(latencies), 3) if latencies else None,
            "latency_min_s": round(min(latencies), 3) if latencies else None,
            "server_generations": after["generations"] - before, "model_loads": after["model_loads"],
            "size": size, "steps": steps, "mode": "mole" if mole else "sum"}


def _table(row: dict) -> str:
    keys = ["mode", "requests", "concurrency", "completed", "failed", "lost", "server_generations", "model_loads",
            "total_s", "latency_min_s", "latency_median_s", "latency_max_s"]
    keys += [k for k in ("base_median_s", "mole_median_s", "mole_over_base") if k in row]
    values = " | ".join(str(row[k]) for k in keys)
    return "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + f"\n| {values} |"


def mole_setup(base: str | None, folder: Path) -> tuple[list[str], str]:
    """App arguments for a MoLE run: the base, three experts (benchmarks.mole_cost.write_experts: rank 4, UNet and
    text attention, non-zero B) as adapters, and a MoLE file of them (gates at their start; the cost of a gate does
    not depend on its values). Returns (arguments, the MoLE file's name in the app)."""
    from benchmarks.mole_cost import write_experts
    from moslora_diffusion.app.cli import default_base_model
    from moslora_diffusion.models.loading import load_pipeline
    from moslora_diffusion.mole import attach_mole, load_experts, save_mole

    base = base or str(default_base_model())
    pipe = load_pipeline(base)
    experts = write_experts(pipe, 4, folder)
    save_mole(attach_mole(pipe, load_experts(pipe, experts)), folder / "composition" / "mole.safetensors", base)
    adapters = [arg for path in experts for arg in ("--adapter", str(path.parent))]
    return ["--base", base, "--mole", str(folder / "composition"), *adapters], "composition"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running app (default: start one on the tiny model)")
    parser.add_argument("--base", help="base model for the app this script starts (default: the app's default)")
    parser.add_argument("--mode", choices=("sum", "mole"), default="sum",
                        help="sum: `generate` requests (sliders); mole: `compose` requests with a MoLE file")
    parser.add_argument("--mole", help="with --url and --mode mole: the name of a MoLE file loaded in that app")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20, help="client threads sending at once")
    parser.add_argument("--size", type=int, default=64, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--latency-repeats", type=int, default=5, help="--mode mole: MoLE / base request pairs "
                        "sent one at a time for the latency comparison (0: none)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for all requests together")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results files")
    args = parser.parse_args(argv)
    if args.mode == "mole" and args.url and not args.mole:
        parser.error("--mode mole with --url needs --mole NAME (a MoLE file loaded in that app)")
    proc, mole = None, args.mole if args.mode == "mole" else None
    with tempfile.TemporaryDirectory(prefix="app-load-") as tmp:
        url = args.url
        if url is None:
            app_args = ["--output_dir", str(Path(tmp) / "outputs")] + (["--base", args.base] if args.base else [])
            if args.mode == "mole":
                extra, mole = mole_setup(args.base, Path(tmp) / "experts")
                app_args = ["--output_dir", str(Path(tmp) / "outputs"), *extra]
            proc, url = start_app(app_args, Path(tmp) / "app.log")
        try:
            row = run_load(url, args.requests, args.concurrency, args.size, args.steps, args.timeout, mole)
            if mole and args.latency_repeats:
                row |= mole_vs_base(url, mole, args.size, args.steps, args.latency_repeats)
        finally:
            if proc is not None:
                stop_app(proc)
    print(_table(row))
    if not args.no_write:
        kind = "MoLE `compose` (3 experts, learned gates)" if mole else "`generate`"
        notes = (f"{args.requests} {kind} requests sent at once ({args.concurrency} client threads, gradio_client) "
                 f"to the app on 127.0.0.1; {args.size}x{args.size} px, {args.steps} steps, tiny model unless --base. "
                 "The app runs one generation at a time (one pipeline); the rest wait in Gradio's queue, so latency "
                 "grows with queue position and total time is about N x one generation. `server_generations` is "
                 "the app's own count: equal to `requests` means none was lost.")
        if mole and args.latency_repeats:
            notes += (f" Then {args.latency_repeats} MoLE and base requests one at a time, interleaved (base: the "
                      "adapter sliders at 0): medians of each and the median of the paired ratios `mole_over_base`.")
        write_results("app_load_mole" if mole else "app_load", [row], _table(row), notes, out_dir=args.out_dir)
    return row


if __name__ == "__main__":
    main()
