"""The Compose tab's layout without a browser: a regional layout of two loaded adapters generates the image and
each expert's mask; its PNG text pasted back reproduces it bit for bit (an uploaded mask included); compare gives
base | sum | MoLE | regional of one seed; the export is a zip of the ComfyUI folder; the fused sliders are restored
exactly; bad layouts are one line before any image."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from comfyui_check import workflow_problems
from mole_helpers import same_state
from mole_helpers import state as weights_of
from PIL import Image
from test_app_compose import dog_cat_app

from moslora_diffusion.app.layout import Layout, Slot
from moslora_diffusion.app.layout_jobs import export_layout, generate_layout, paste_layout
from moslora_diffusion.composition import CompositionError
from moslora_diffusion.generation.text_to_image import GenerationRequest, MoLESettings


@pytest.fixture(scope="module")
def app(tiny_sd15_dir, tmp_path_factory):
    return dog_cat_app(tiny_sd15_dir, tmp_path_factory)


def _request(seed=5) -> GenerationRequest:
    # the sum sliders ride along as the UI sends them; a layout ignores them (its experts have their own scales)
    return GenerationRequest("a photo of sks dog and a cat", "", seed, 2, 5.0, 64, 64, 1, "DDIM",
                             {"dog": 0.8, "cat": 0.3})


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _mask(tmp_path) -> str:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[20:60, 32:64] = 200
    Image.fromarray(mask, "L").save(tmp_path / "upload.png")
    return str(tmp_path / "upload.png")


def test_a_layout_generates_with_masks_and_pasting_its_text_reproduces_it(app, tmp_path):
    layout = Layout("regional", [Slot("dog", "left half", prompt="a photo of sks dog", scale=1.2),
                                 Slot("cat", "mask", mask=_mask(tmp_path))])
    before = weights_of(app.pipe)
    out = generate_layout(app, _request(), layout)
    assert same_state(weights_of(app.pipe), before)  # the fused sliders are back exactly
    (saved,) = out.saved
    assert "Composition: regional" in saved.infotext and "Layout:" in saved.infotext
    dog = _pixels(saved.path.with_name(saved.path.stem + "-mask-dog.png")) / 255
    cat = _pixels(saved.path.with_name(saved.path.stem + "-mask-cat.png")) / 255
    assert dog[:, :32].min() == 1 and dog[:, 32:].max() == 0
    assert cat[24:56, 32:].min() > 0.7 and cat[:16].max() == 0  # the uploaded mask, at the latent's resolution
    assert [label for _, label in out.overlays] == ["dog (regional)", "cat (regional)"]

    req, mode, pasted = paste_layout(app, saved.infotext)
    assert mode == "layout" and pasted.method == "regional" and req.seed == 5
    assert [(s.adapter, s.where, s.prompt, s.scale) for s in pasted.slots] == [
        ("dog", "left half", "a photo of sks dog", 1.2), ("cat", "mask", "", 1.0)]
    again = generate_layout(app, req, pasted).saved[0]
    assert np.array_equal(_pixels(again.path), _pixels(saved.path))  # bit for bit, the mask read back too
    other = generate_layout(app, req, Layout("regional", [Slot("dog", "right half"), Slot("cat", "left half")]))
    assert not np.array_equal(_pixels(other.saved[0].path), _pixels(saved.path))  # the layout matters


def test_the_latent_blend_is_a_method_choice_and_its_text_pasted_back_keeps_it(app):
    from moslora_diffusion.app.layout import METHOD_LABELS, layout_for
    from moslora_diffusion.app.layout_ui import layout_of

    label = "regional (latent blend)"
    assert METHOD_LABELS.index(label) == METHOD_LABELS.index("regional") + 1
    slots = [Slot("dog", "left half", prompt="a photo of sks dog"), Slot("cat", "right half")]
    layout = layout_for(label, slots)
    assert (layout.method, layout.blend, layout.label) == ("regional", "latent", label)
    values = [s.adapter for s in slots] + ["", ""] + [s.where for s in slots] + ["", ""] + [""] * 4 + [None] * 4 \
        + [s.prompt for s in slots] + ["", ""] + [1.0] * 4
    assert layout_of(label, values).blend == "latent"  # what the dropdown hands over
    saved = generate_layout(app, _request(seed=4), layout).saved[0]
    assert "Composition: regional" in saved.infotext and "Blend: latent" in saved.infotext
    attention = generate_layout(app, _request(seed=4), layout_for("regional", slots)).saved[0]
    assert "Blend" not in attention.infotext
    assert not np.array_equal(_pixels(attention.path), _pixels(saved.path))  # the blend changes the image
    req, _, pasted = paste_layout(app, saved.infotext)
    assert pasted.label == label
    assert np.array_equal(_pixels(generate_layout(app, req, pasted).saved[0].path), _pixels(saved.path))


def test_a_background_expert_and_the_fitted_blend_are_choices_and_their_text_pasted_back_keeps_them(app,
                                                                                                     monkeypatch):
    from moslora_diffusion.app.layout import FITTED_LABEL, METHOD_LABELS, layout_for

    # the tiny random model's "subject" stands out everywhere at 0.35: a high threshold makes the region shrink
    monkeypatch.setattr("moslora_diffusion.composition.latent_blend.DEFAULT_FIT_THRESHOLD", 0.9)
    assert METHOD_LABELS.index(FITTED_LABEL) == METHOD_LABELS.index("regional (latent blend)") + 1
    layout = layout_for(FITTED_LABEL, [Slot("dog", "left half", prompt="a photo of sks dog"),
                                       Slot("cat", "background")])
    req = GenerationRequest("a photo of sks dog and a cat", "", 6, 4, 5.0, 64, 64, 1, "DDIM")
    saved = generate_layout(app, req, layout)
    text = saved.saved[0].infotext
    assert "Background: cat" in text and "Fit steps: 1" in text and "Blend: latent" in text  # 0.3 x 4 steps
    req2, _, pasted = paste_layout(app, text)
    assert pasted.label == FITTED_LABEL and pasted.slots[1].where == "background"
    again = generate_layout(app, req2, pasted).saved[0]
    assert np.array_equal(_pixels(again.path), _pixels(saved.saved[0].path))  # bit for bit
    plain = generate_layout(app, req, layout_for("regional (latent blend)", layout.slots)).saved[0]
    assert not np.array_equal(_pixels(plain.path), _pixels(saved.saved[0].path))  # fitting changes the image


@pytest.mark.parametrize("label, slots, words", [
    ("regional (latent blend)", [Slot("dog", "left half"), Slot("cat", "right half")], "the latent blend has no "
     "ComfyUI workflow"),  # it was exported as the attention blend without a word
    ("regional", [Slot("dog", "left half"), Slot("cat", "background")], "a background is not exported to a workflow"),
])
def test_what_a_workflow_cannot_hold_is_refused_at_export(app, label, slots, words):
    from moslora_diffusion.app.layout import layout_for

    with pytest.raises(CompositionError, match=words):
        export_layout(app, _request(), layout_for(label, slots))


def test_compare_gives_base_sum_mole_and_the_layout_of_one_seed(app):
    layout = Layout("regional", [Slot("dog", "left half"), Slot("cat", "right half")])
    out = generate_layout(app, _request(seed=9), layout, compare=True, mole=MoLESettings("dog+cat"))
    assert [s.label for s in out.saved] == ["base", "sum", "mole", "regional"]
    assert all("Seed: 9," in s.infotext for s in out.saved)
    alone = generate_layout(app, _request(seed=9), layout).saved[0]
    assert np.array_equal(_pixels(alone.path), _pixels(out.saved[-1].path))


def test_the_export_zip_holds_the_comfyui_folder(app):
    layout = Layout("regional", [Slot("dog", "left half", prompt="sks dog"), Slot("cat", "right half")])
    path = export_layout(app, _request(seed=3), layout)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        workflow = json.loads(archive.read(next(n for n in names if n.endswith("workflow_api.json"))))
        text = archive.read(next(n for n in names if n.endswith("a1111-regional-prompter.txt"))).decode()
    assert workflow_problems(workflow) == []
    assert sum(n.endswith(".safetensors") for n in names) == 2 and sum("/masks/" in n for n in names) == 2
    assert "sks dog <lora:dog:1> BREAK" in text and "Divide ratio: 32,32" in text


@pytest.mark.parametrize("layout, words", [
    (Layout("regional", [Slot("dog", "automatic"), Slot("cat", "automatic")]),
     "automatic regions come from method auto"),
    (Layout("sum", [Slot("dog", "left half"), Slot("cat")]), "method 'sum' takes no regions"),
    (Layout("regional", [Slot("dog", "box", box="0,0,2,1"), Slot("cat")]), "must satisfy 0 <= x0 < x1 <= 1"),
    (Layout("regional", [Slot("dog", "mask"), Slot("cat")]), "dog: upload a mask"),
    (Layout("regional", [Slot("dog", "left half"), Slot("bird")]), "no adapter loaded named bird"),
    (Layout("regional", [Slot("dog", "left half"), Slot("dog")]), "an adapter is in two slots"),
    (Layout("sum", [Slot("dog", "background"), Slot("cat")]), "dog: a background is for method regional"),
    (Layout("regional", [Slot("dog", "background"), Slot("cat", "background")]), "two backgrounds"),
])
def test_bad_layouts_are_refused_before_any_image(app, layout, words, monkeypatch):
    count = app.generations
    monkeypatch.setattr("moslora_diffusion.app.layout_jobs.generate", None)  # compare's first image never starts
    with pytest.raises((CompositionError, ValueError), match=words.replace("(", r"\(")):
        generate_layout(app, _request(), layout, compare=True)
    assert app.generations == count


def test_automatic_regions_export_is_refused_saying_what_to_do(app):
    with pytest.raises(CompositionError, match="cannot express method 'auto'.*--region_mask"):
        export_layout(app, _request(), Layout("auto", [Slot("dog", "automatic"), Slot("cat", "automatic")]))


def test_automatic_regions_show_each_experts_found_mask(app):
    # both test adapters were trained on "a photo of sks dog": the region prompt names each one's trigger word
    shared = Layout("auto", [Slot("dog", "automatic"), Slot("cat", "automatic")])
    with pytest.raises(CompositionError, match="every word of expert 'dog''s training prompt .* is another expert's"):
        generate_layout(app, _request(), shared, compare=True)
    layout = Layout("auto", [Slot("dog", "automatic", prompt="dog"), Slot("cat", "automatic", prompt="zwx")])
    req = GenerationRequest("a photo of sks dog and zwx cat", "", 4, 4, 5.0, 64, 64, 1, "DDIM")
    out = generate_layout(app, req, layout)
    assert "Composition: auto" in out.saved[0].infotext
    masks = [np.asarray(Image.open(out.saved[0].path.with_name(f"{out.saved[0].path.stem}-mask-{n}.png")))
             for n in ("dog", "cat")]
    assert all(m.max() > 0 for m in masks) and [label for _, label in out.overlays] == ["dog (auto)", "cat (auto)"]
    req, _, pasted = paste_layout(app, out.saved[0].infotext)
    assert [s.prompt for s in pasted.slots] == ["dog", "zwx"]
    again = generate_layout(app, req, pasted).saved[0]
    assert np.array_equal(_pixels(again.path), _pixels(out.saved[0].path))
