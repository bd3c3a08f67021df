"""The Compose tab's layout in a real headless browser (Debian's chromium driven by playwright, as
tests/test_app_browser.py): two experts laid out left and right, generate, both masks shown, export, download the
zip (its workflow fits ComfyUI's node list); then 20 layout requests at once through the API, none lost."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pytest
from comfyui_check import workflow_problems
from conftest import make_adapter
from PIL import Image
from test_app_browser import _set_number, open_page

from benchmarks import app_load
from moslora_diffusion.app.layout_ui import LAYOUT_SLOTS
from moslora_diffusion.app.ui_common import MAX_SLOTS
from moslora_diffusion.mole import MAX_EXPERTS

LAYOUT_SCREENSHOT = Path(__file__).resolve().parents[1] / "assets" / "compose_layout.png"


@pytest.fixture(scope="module")
def server(tiny_sd15_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("layout-app")
    for seed, name in ((1, "dog"), (3, "cat")):
        make_adapter(tiny_sd15_dir, root / "given" / name / "moslora.safetensors", seed=seed)
    base = root / "tiny-sd15"
    base.symlink_to(tiny_sd15_dir, target_is_directory=True)
    proc, url = app_load.start_app(["--base", str(base), "--adapter", str(root / "given" / "dog"), "--adapter",
                                    str(root / "given" / "cat"), "--output_dir", str(root / "outputs")],
                                   root / "app.log")
    yield {"url": url, "root": root}
    app_load.stop_app(proc)


@pytest.fixture(scope="module")
def page(server):
    yield from open_page(server["url"], 1500, 1100)


def _pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def _small_png(page, path: Path) -> None:
    page.locator("#layout-panel").scroll_into_view_if_needed()
    page.screenshot(path=str(path), full_page=True)
    picture = Image.open(path).convert("RGB")
    picture.thumbnail((1000, 1000))
    picture.quantize(48).save(path, optimize=True)


def test_lay_out_two_experts_generate_see_both_masks_export_and_download(page, server, tmp_path):
    page.get_by_role("tab", name="Compose").click()
    for elem_id, value in (("compose-steps", 2), ("compose-width", 64), ("compose-height", 64)):
        _set_number(page, elem_id, value)
    page.locator("#compose-seed input").fill("7")
    page.locator("#compose-prompt textarea").fill("a photo of sks dog and a cat")
    _pick(page, "layout-adapter-0", "dog")
    _pick(page, "layout-where-0", "left half")
    _pick(page, "layout-adapter-1", "cat")
    _pick(page, "layout-where-1", "box")
    page.locator("#layout-box-1 textarea, #layout-box-1 input").first.fill("0.5,0,1,1")
    page.locator("#layout-prompt-0 textarea, #layout-prompt-0 input").first.fill("a photo of sks dog")
    page.locator("#layout-generate").click()
    page.wait_for_function("document.querySelector('#compose-infotext textarea').value.includes('Composition: "
                           "regional')")
    page.wait_for_function("document.querySelectorAll('#layout-masks img').length >= 2")
    infotext = page.locator("#compose-infotext textarea").input_value()
    assert "Regions: dog: box 0 0 0.5 1 (a photo of sks dog) | cat: box 0.5 0 1 1" in infotext
    captions = page.locator("#layout-masks").inner_text()
    assert "dog (regional)" in captions and "cat (regional)" in captions
    pngs = sorted((server["root"] / "outputs" / "images").rglob("*-regional-mask-*.png"))
    assert [p.name.rsplit("-", 1)[1] for p in pngs] == ["cat.png", "dog.png"]

    page.locator("#layout-export").click()
    page.wait_for_function("document.querySelector('#layout-message').innerText.includes('Wrote')")
    with page.expect_download() as download:
        page.locator("#layout-export-file a").first.click()
    with zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())) as archive:
        names = archive.namelist()
        workflow = json.loads(archive.read(next(n for n in names if n.endswith("workflow_api.json"))))
    assert workflow_problems(workflow) == []
    assert sorted(Path(n).name for n in names if "/loras/" in n) == ["cat.safetensors", "dog.safetensors"]
    screenshot = LAYOUT_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "layout.png"
    _small_png(page, screenshot)
    assert screenshot.stat().st_size > 10_000


def _layout_args(i: int) -> list:
    # the generate fields, method, compare, MoLE file, then per slot field (adapter, where, box, mask, prompt,
    # scale) LAYOUT_SLOTS values, each MoLE expert's scale and mask box, the sum sliders
    slots = (["dog", "cat"] + [None] * (LAYOUT_SLOTS - 2) + ["left half", "right half"]
             + ["whole image"] * (LAYOUT_SLOTS - 2) + [""] * LAYOUT_SLOTS + [None] * LAYOUT_SLOTS
             + [""] * LAYOUT_SLOTS + [1.0] * LAYOUT_SLOTS)
    return ([f"a photo of sks dog and a cat, request {i}", "", i, 1, 5.0, 64, 64, "DDIM", "regional", False, None]
            + slots + [1.0] * MAX_EXPERTS + [False] * MAX_EXPERTS + [0.8] * MAX_SLOTS)


def test_twenty_concurrent_layout_requests_none_lost(server):
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    before = client.predict(api_name="/status")

    def one(i: int) -> int:
        gallery, infotext, masks, _, message, _ = client.predict(*_layout_args(i), api_name="/compose_layout")
        if message or len(gallery) != 1 or f"Seed: {i}," not in infotext or len(masks) != 2:
            raise RuntimeError(message or f"unexpected result {gallery!r}")
        return i

    start, done, failed = time.monotonic(), [], []
    with ThreadPoolExecutor(20) as pool:
        for future in as_completed([pool.submit(one, i) for i in range(20)], timeout=300):
            try:
                done.append(future.result())
            except Exception as err:  # counted, then asserted on below with the message
                failed.append(str(err))
    after = client.predict(api_name="/status")
    assert (sorted(done), failed) == (list(range(20)), [])
    assert after["generations"] - before["generations"] == 20 and after["model_loads"] == 1
    assert time.monotonic() - start < 300
