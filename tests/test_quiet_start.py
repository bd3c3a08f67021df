"""A first command prints its own work and no library noise: no transformers torchvision fallback notes at
import, no Gradio share hint; progress bars for the steps that take time (console/quiet.py, generate.py)."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import time

from training_helpers import REPO, cli_env

# Progress bars (tqdm, diffusers' loading bars) are the only lines a quiet start may print on stderr.
BAR = re.compile(r"^(Loading pipeline components|Loading weights|generating \d+ images)\.*:?\s")


def _noise(stderr: str) -> list[str]:
    parts = [p.strip() for p in re.split(r"[\r\n]", stderr) if p.strip()]
    return [p for p in parts if not BAR.match(p.replace("\x1b[A", ""))]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=300)


def test_help_and_a_first_generate_print_no_library_warnings(tiny_sd15_dir, tmp_path):
    help_run = _run("-m", "moslora_diffusion.generate", "--help")
    assert help_run.returncode == 0 and help_run.stderr == ""
    proc = _run("-m", "moslora_diffusion.generate", "--base", str(tiny_sd15_dir), "--prompt", "a photo of a dog",
                "--seeds", "0", "1", "--steps", "3", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert _noise(proc.stderr) == [], _noise(proc.stderr)
    assert "generating 2 images: 100%" in proc.stderr and "6/6" in proc.stderr  # the progress bar, in steps
    # the last line names the dated folder the images went to (nothing else on stdout)
    assert re.fullmatch(rf"wrote 2 images in {re.escape(str(tmp_path / 'out'))}/\d{{4}}-\d\d-\d\d",
                        proc.stdout.strip()), proc.stdout


def test_the_filters_drop_only_their_own_message(caplog):
    import moslora_diffusion  # noqa: F401  (installs the filters)

    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger="transformers.utils.import_utils"):
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `X` ...")
        logger.warning("something else that transformers says")
    assert [r.getMessage() for r in caplog.records] == ["something else that transformers says"]
    lora = logging.getLogger("diffusers.loaders.lora_base")
    with caplog.at_level(logging.WARNING, logger="diffusers.loaders.lora_base"):
        lora.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. ...")
        lora.warning("No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'. ...")
    assert [r.getMessage()[:41] for r in caplog.records[1:]] == ["No LoRA keys associated to UNet2DConditio"]


def test_the_app_says_where_it_runs_without_gradios_share_hint(tiny_sd15_dir, tmp_path):
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = subprocess.Popen([sys.executable, "app.py", "--base", str(tiny_sd15_dir), "--output_dir",
                            str(tmp_path / "outputs"), "--port", str(port)], cwd=REPO, env=cli_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            line = app.stdout.readline()
            lines.append(line)
            if line.startswith("Running on") or not line:
                break
    finally:
        app.terminate()
        app.wait(timeout=30)
    text = "".join(lines)
    assert f"Running on http://127.0.0.1:{port}/" in text, text
    assert "share=True" not in text and "torchvision" not in text and "HTTP Request" not in text
