"""The Compose tab's layout panel: per expert slot an adapter, where it acts (preset half or quarter, whole image,
typed box, uploaded mask, background, automatic), a region prompt and a scale; the method; Generate (alone or
compared with base | sum | MoLE), Export for ComfyUI / A1111 (a zip to download), and the mask each expert used
over the image. Handlers are thin: layout_jobs.py does the work."""

from __future__ import annotations

import gradio as gr

from ..generation.text_to_image import GenerationRequest
from .layout import METHOD_LABELS, WHERE, Layout, Slot, layout_for
from .layout_jobs import export_layout, generate_layout
from .ui_common import USER_ERRORS, refuse, slider_scales

LAYOUT_SLOTS = 4
DEFAULT_WHERE = ("left half", "right half", "whole image", "whole image")
SLOT_FIELDS = ("adapter", "where", "box", "mask", "prompt", "scale")


def layout_panel(state) -> dict:
    """The widgets (inside the tab's left column); L["slots"][field] is a list of LAYOUT_SLOTS widgets."""
    names = state.fusion.names()
    L = {"slots": {f: [] for f in SLOT_FIELDS}}
    with gr.Accordion("Layout: where each subject goes", open=True, elem_id="layout-panel"):
        L["method"] = gr.Dropdown(list(METHOD_LABELS), value="regional", label="Method (regional: the boxes and "
                                  "masks; its latent blend: each region drawn by its expert alone, about N x the time; "
                                  "fitted: after 30% of the steps each region shrinks to its subject and the "
                                  "background expert, else the base, draws the rest; auto: every expert automatic)",
                                  elem_id="layout-method")
        for i in range(LAYOUT_SLOTS):
            with gr.Row(equal_height=True):
                slots = L["slots"]
                slots["adapter"].append(gr.Dropdown(names, value=names[i] if i < len(names) and i < 2 else None,
                                                    label=f"Expert {i + 1}", elem_id=f"layout-adapter-{i}",
                                                    allow_custom_value=True, scale=2))
                slots["where"].append(gr.Dropdown(list(WHERE), value=DEFAULT_WHERE[i], label="Where",
                                                  elem_id=f"layout-where-{i}", scale=2))
                slots["box"].append(gr.Textbox(label="Box x0,y0,x1,y1", placeholder="0.25,0,0.75,1", scale=2,
                                               elem_id=f"layout-box-{i}"))
                slots["mask"].append(gr.File(label="Mask PNG", file_types=["image"], type="filepath", scale=2,
                                             elem_id=f"layout-mask-{i}", height=90))
                slots["prompt"].append(gr.Textbox(label="Region prompt (optional; automatic: its trigger word)",
                                                  elem_id=f"layout-prompt-{i}", scale=3))
                slots["scale"].append(gr.Number(value=1.0, label="Scale", elem_id=f"layout-scale-{i}", scale=1,
                                                minimum=-2, maximum=2))
        L["compare"] = gr.Checkbox(label="compare: base | sum | MoLE | layout (one seed; MoLE when a MoLE file is "
                                   "chosen above)", elem_id="layout-compare")
        with gr.Row():
            L["go"] = gr.Button("Generate with the layout", variant="primary", elem_id="layout-generate")
            L["export"] = gr.Button("Export for ComfyUI / A1111", elem_id="layout-export")
        L["message"] = gr.Markdown(elem_id="layout-message")
        L["file"] = gr.File(label="Export (zip: LoRAs, masks, ComfyUI workflow, Regional Prompter text)",
                            elem_id="layout-export-file")
    return L


def slot_inputs(L: dict) -> list:
    return [w for f in SLOT_FIELDS for w in L["slots"][f]]


def layout_of(method: str, values) -> Layout:
    """The Layout from slot_inputs' values (field by field, LAYOUT_SLOTS each)."""
    by_field = {f: values[k * LAYOUT_SLOTS:(k + 1) * LAYOUT_SLOTS] for k, f in enumerate(SLOT_FIELDS)}
    slots = [Slot(by_field["adapter"][i] or "", by_field["where"][i] or "whole image", by_field["box"][i] or "",
                  by_field["mask"][i] or None, by_field["prompt"][i] or "",
                  1.0 if by_field["scale"][i] is None else float(by_field["scale"][i])) for i in range(LAYOUT_SLOTS)]
    return layout_for(method, slots)


def layout_updates(layout: Layout | None, names: list[str]) -> list:
    """One update per slot widget (slot_inputs order) showing `layout`; choices refreshed from `names`."""
    if layout is None:
        return [gr.skip()] * (LAYOUT_SLOTS * len(SLOT_FIELDS))
    used = layout.used() + [Slot("")] * LAYOUT_SLOTS
    values = {"adapter": [gr.update(choices=names, value=s.adapter or None) for s in used[:LAYOUT_SLOTS]],
              "where": [gr.update(value=s.where) for s in used[:LAYOUT_SLOTS]],
              "box": [gr.update(value=s.box) for s in used[:LAYOUT_SLOTS]],
              "mask": [gr.update(value=s.mask) for s in used[:LAYOUT_SLOTS]],
              "prompt": [gr.update(value=s.prompt) for s in used[:LAYOUT_SLOTS]],
              "scale": [gr.update(value=s.scale) for s in used[:LAYOUT_SLOTS]]}
    return [u for f in SLOT_FIELDS for u in values[f]]


def wire_layout(state, c: dict, L: dict, settings_of, status) -> None:
    """Generate and Export; settings_of(mole, expert values) gives the MoLE settings (compose_ui._settings)."""
    fields = [c[k] for k in ("prompt", "negative", "seed", "steps", "guidance", "width", "height", "scheduler")]
    n_slot, n_expert = LAYOUT_SLOTS * len(SLOT_FIELDS), len(c["scales"]) + len(c["masks"])

    def split(values):
        return values[:n_slot], values[n_slot:n_slot + n_expert], values[n_slot + n_expert:]

    def generate(prompt, negative, seed, steps, guidance, width, height, scheduler, method, compare, mole, *values):
        slot_values, experts, sliders = split(values)
        try:
            request = GenerationRequest(prompt, negative, seed, steps, guidance, width, height, 1, scheduler,
                                        slider_scales(state, sliders))
            out = generate_layout(state, request, layout_of(method, slot_values), bool(compare),
                                  settings_of(mole, experts) if compare and mole else None)
            heatmap = state.compose.heatmap() if compare and mole else gr.skip()
        except USER_ERRORS as err:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), refuse(err), state.status_text()
        gallery = [(str(s.path), s.label) for s in out.saved]
        return (gallery, "\n\n".join(s.infotext for s in out.saved), out.overlays, heatmap, "",
                state.status_text())

    def export(prompt, negative, seed, steps, guidance, width, height, scheduler, method, *slot_values):
        try:
            request = GenerationRequest(prompt, negative, seed, steps, guidance, width, height, 1, scheduler)
            path = export_layout(state, request, layout_of(method, slot_values))
        except USER_ERRORS as err:
            return gr.skip(), refuse(err)
        return str(path), f"Wrote `{path.name}`: unzip it and follow its README.txt"

    for adapter in L["slots"]["adapter"]:  # adapters loaded since the page was drawn are offered
        adapter.focus(lambda: gr.update(choices=state.fusion.names()), outputs=adapter, api_visibility="private",
                      queue=False, show_progress="hidden")
    L["go"].click(generate, inputs=[*fields, L["method"], L["compare"], c["mole"], *slot_inputs(L), *c["scales"],
                                    *c["masks"], *c["slots"]],
                  outputs=[c["gallery"], c["infotext"], c["layout_masks"], c["heatmap"], L["message"], status],
                  api_name="compose_layout", concurrency_id="generate")
    L["export"].click(export, inputs=[*fields, L["method"], *slot_inputs(L)], outputs=[L["file"], L["message"]],
                      api_name="export_layout", concurrency_id="export")
