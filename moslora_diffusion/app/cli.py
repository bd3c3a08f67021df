"""`python app.py`: the command line of the web app.

    python app.py --base <hub id | diffusers folder | model.safetensors> --adapter <training folder> ...

Serves on 127.0.0.1 only unless --host 0.0.0.0 or --share is asked for explicitly.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import socket
from pathlib import Path

from ..checks import Range, check_number
from ..checks.devices import check_device
from ..console import OneLineErrorParser, add_debug_flag, run_command
from ..formats.export_targets import parse_adapter_spec

log = logging.getLogger("moslora_diffusion.app")
CACHE_DIR = Path(os.environ.get("MOSLORA_CACHE", "~/.cache/moslora-diffusion")).expanduser()


REPO_ROOT = Path(__file__).resolve().parents[2]
TOY_BASE = REPO_ROOT / "assets" / "toy-base"
PORT = Range(1, 65535, integer=True)  # TCP ports
DEMO_ADAPTER = REPO_ROOT / "outputs" / "demo"  # what scripts/demo.sh trains


def default_base_model() -> Path:
    """The model used when no --base is given: the shipped toy base model (assets/toy-base); in a copy of the
    package without the repository's assets, a tiny random SD 1.5 pipeline built on the spot."""
    from ..models.tiny import save_tiny_pipeline

    if (TOY_BASE / "model_index.json").is_file():
        return TOY_BASE
    folder = CACHE_DIR / "tiny-sd15"
    if not (folder / "model_index.json").is_file():
        # Written aside and renamed (files/atomic.py): two starting apps never see a half-written model.
        save_tiny_pipeline("sd15", folder, overwrite=True)
    return folder


def default_adapters(base: Path) -> list[str]:
    """With neither --base nor --adapter: the demo's adapter on the toy base, once scripts/demo.sh has run."""
    if base == TOY_BASE and (DEMO_ADAPTER / "moslora.safetensors").is_file():
        return [str(DEMO_ADAPTER)]
    return []


def _auth(text: str | None):
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth must be USER:PASSWORD")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="app.py", description="Generate, export and train MoSLoRA adapters in "
                                     "a web UI.")
    parser.add_argument("--base", help="hub id, diffusers folder or single .safetensors checkpoint "
                        "(default: the shipped toy model, assets/toy-base, with the demo's adapter outputs/demo "
                        "once scripts/demo.sh has trained it)")
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                        help="training output folder or adapter .safetensors (repeatable); only these folders "
                             "and the app's own outputs are ever read")
    parser.add_argument("--mole", action="append", default=[], metavar="PATH",
                        help="MoLE file (mole.safetensors) or the gate-training folder holding it, for the Compose "
                             "tab (repeatable)")
    parser.add_argument("--photos_dir", action="append", default=[], metavar="DIR",
                        help="folder of subject photo folders the Train tab may pick from (repeatable)")
    parser.add_argument("--config", help="diffusers folder with the configs of a single-file --base (offline)")
    parser.add_argument("--output_dir", default="outputs", help="images, exports and training runs (default: "
                        "./outputs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (1 to 65535)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument("--auth", type=_auth, metavar="USER:PASSWORD", default=os.environ.get("MOSLORA_APP_AUTH"),
                        help="require a login (or set MOSLORA_APP_AUTH, which keeps it out of `ps`)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    add_debug_flag(parser)
    return parser


def check_port_free(host: str, port: int) -> None:
    """ValueError (one line) when another program already listens on `port` there: Gradio said so only after the
    model had loaded, naming an environment variable instead of --port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free to serve
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(f"--port {port} on {host} is not free ({err.strerror}): another program serves there; "
                             "choose another --port") from None


def check_paths(args: argparse.Namespace) -> None:
    """Refuses, in one line and before the model loads, a --photos_dir that is not a folder and a --mole that
    is not a MoLE file (a DreamBooth training folder, a folder without mole.safetensors, a damaged file)."""
    for folder in args.photos_dir:
        path = Path(folder).expanduser()
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"--photos_dir {folder} is a file; give a folder of photos")
        if not path.exists():
            raise FileNotFoundError(f"--photos_dir {folder}: no such folder; give a folder of photos")
    if not args.mole:
        return
    from ..mole.cli import mole_file
    from ..mole.experts import MoLEError
    from ..mole.file import FILE_NAME, read_mole

    for given in args.mole:
        path = Path(given).expanduser()
        if not path.exists():
            continue  # open_app_state names it, with the --adapter paths
        try:
            file = mole_file(path)  # the check of `python -m moslora_diffusion.mole generate`
        except MoLEError:
            raise MoLEError(f"--mole {given} is a DreamBooth training folder (one expert's moslora.safetensors), "
                            "not a MoLE: give it with --adapter, or train gates over several experts on the "
                            "Compose tab or with `python -m moslora_diffusion.mole train`") from None
        if not file.is_file():
            raise MoLEError(f"--mole {given}: no {FILE_NAME} in that folder; give a MoLE file or the gate-training "
                            "folder holding it")
        if file.suffix.lower() != ".safetensors":
            raise MoLEError(f"--mole {given} is not a .safetensors file; give a MoLE file ({FILE_NAME}) or the "
                            "gate-training folder holding it")
        try:
            read_mole(file)  # a damaged file or another kind of .safetensors: MoLEError naming it
        except MoLEError as err:  # most often an expert's own file, given to the wrong flag
            raise MoLEError(f"{err}; an adapter (moslora.safetensors or a LoRA file) goes to --adapter") from None


def running_line(host: str, local_url: str, share_url: str | None = None) -> str:
    """Where the app answers. Gradio's local URL says localhost even when --host opened every network interface
    (0.0.0.0 or ::), which read as if the flag had been ignored: then both are said."""
    where = local_url
    if host in ("0.0.0.0", "::"):
        port = local_url.rstrip("/").rsplit(":", 1)[-1]
        where = (f"every network interface, port {port} ({local_url} on this machine, http://<its address>:{port} "
                 "from others)")
    return f"Running on {where}" + (f" and {share_url}" if share_url else "") + " (Ctrl-C stops it)"


def main(argv: list[str] | None = None) -> int:
    """A bad --base / --adapter / --mole / --photos_dir ends in one line `error: ...`, exit status 2
    (console/exits.py)."""
    return run_command(_serve, argv)


def _serve(argv: list[str]) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local tool
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's start-up requests to itself, one line each
    args = build_parser().parse_args(argv)
    check_number("--port", args.port, PORT)  # before the model loads
    check_device(args.device)
    check_port_free(args.host, args.port)
    check_paths(args)
    from .state import open_app_state
    from .ui import build_ui
    from .uploads import MAX_UPLOAD_BYTES

    base = args.base or default_base_model()
    specs = [parse_adapter_spec(text) for text in args.adapter]  # PATH[:SCALE], as generate and export take them
    adapters = [path for path, _ in specs] or ([] if args.base else default_adapters(base))
    if not adapters and not args.base:  # the README promises the demo's adapter: say why it is not there
        print(f"no adapter: {DEMO_ADAPTER} appears once `bash scripts/demo.sh` has run (or give --adapter); "
              "opening the toy base model alone", flush=True)
    state = open_app_state(base, args.output_dir, adapters, args.config, args.photos_dir, args.device, args.mole,
                           [scale for _, scale in specs])
    atexit.register(state.training.shutdown)
    if (args.share or args.host not in ("127.0.0.1", "localhost")) and args.auth is None:
        log.warning("serving beyond this machine without --auth: anyone who can reach it can use it")
    demo = build_ui(state)
    demo.queue(max_size=256, default_concurrency_limit=1)  # one pipeline: requests wait their turn
    # quiet: Gradio's own lines (among them its hint to set share=True, which --share does) give way to ours
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=args.auth,
                allowed_paths=[str(state.outputs)], max_file_size=f"{MAX_UPLOAD_BYTES // 2**20}mb", ssr_mode=False,
                show_error=False, footer_links=["api"], quiet=True, prevent_thread_lock=True)
    print(running_line(args.host, demo.local_url, demo.share_url), flush=True)
    demo.block_thread()
