"""Load on the running web app: N concurrent `generate` requests through its API, all queued, none lost.

Starts the app (tiny model by default) on 127.0.0.1 in a subprocess unless --url names a running one,
fires --requests generate calls at once from --concurrency threads through gradio_client, and records
the total time, per-request latency and the app's own generation count (which must grow by exactly N).

    python -m benchmarks.app_load                       # 20 requests, writes benchmarks/results/app_load.{md,json}
    python -m benchmarks.app_load --url http://127.0.0.1:7860 --requests 50
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
SLOTS = 8  # adapter slider slots of the Generate tab (moslora_diffusion.app.ui.MAX_SLOTS)


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


def run_load(url: str, requests: int, concurrency: int, size: int, steps: int, timeout_s: float) -> dict:
    """Fires the requests at once; counts completions, failures and requests still pending at the deadline."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    before = client.predict(api_name="/status")["generations"]
    latencies, failures = [], []

    def one(i: int) -> float:
        start = time.perf_counter()
        gallery, infotext, message, _ = client.predict(*_generate_args(i, size, steps), api_name="/generate")
        if message or len(gallery) != 1 or f"Seed: {i}," not in infotext:
            raise RuntimeError(message or f"unexpected result {gallery!r}")
        return time.perf_counter() - start

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
            "size": size, "steps": steps}


def _table(row: dict) -> str:
    keys = ["requests", "concurrency", "completed", "failed", "lost", "server_generations", "model_loads", "total_s",
            "latency_min_s", "latency_median_s", "latency_max_s"]
    values = " | ".join(str(row[k]) for k in keys)
    return "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + f"\n| {values} |"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running app (default: start one on the tiny model)")
    parser.add_argument("--base", help="base model for the app this script starts (default: the app's default)")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20, help="client threads sending at once")
    parser.add_argument("--size", type=int, default=64, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600, help="seconds for all requests together")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results files")
    args = parser.parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory(prefix="app-load-") as tmp:
        url = args.url
        if url is None:
            app_args = ["--output_dir", str(Path(tmp) / "outputs")] + (["--base", args.base] if args.base else [])
            proc, url = start_app(app_args, Path(tmp) / "app.log")
        try:
            row = run_load(url, args.requests, args.concurrency, args.size, args.steps, args.timeout)
        finally:
            if proc is not None:
                stop_app(proc)
    print(_table(row))
    if not args.no_write:
        notes = (f"{args.requests} `generate` requests sent at once ({args.concurrency} client threads, gradio_client) "
                 f"to the app on 127.0.0.1; {args.size}x{args.size} px, {args.steps} steps, tiny model unless --base. "
                 "The app runs one generation at a time (one pipeline); the rest wait in Gradio's queue, so latency "
                 "grows with queue position and total time is about N x one generation. `server_generations` is "
                 "the app's own count: equal to `requests` means none was lost.")
        write_results("app_load", [row], _table(row), notes, out_dir=args.out_dir)
    return row


if __name__ == "__main__":
    main()
