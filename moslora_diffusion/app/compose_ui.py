"""The Compose tab: generate with several subjects by weighted sum (the Generate tab's sliders) or MoLE (learned
gates, per-expert mask and extra scale), compare both with the base model, see the gates, load MoLE files, train
gates for loaded adapters, export the composition, paste parameters back. Handlers are thin, as in ui.py."""

from __future__ import annotations

import gradio as gr

from ..checks import SCALE_MAX, SCALE_MIN
from ..generation.text_to_image import MAX_GUIDANCE, MAX_SEED, MAX_SIDE, MAX_STEPS, SCHEDULERS, GenerationRequest
from ..generation.text_to_image import MoLESettings as Settings
from ..mole import MAX_EXPERTS
from .charts import loss_curve_image
from .compose import MODES, generate_composed
from .exporting import EXPORT_DTYPES, EXPORT_TARGETS, export_mole
from .gate_jobs import GateSettings, expert_defaults, register_finished_gates, start_gate_training
from .layout_jobs import paste_layout
from .layout_ui import LAYOUT_SLOTS, SLOT_FIELDS, layout_panel, layout_updates, slot_inputs, wire_layout
from .state import AppState
from .ui_common import MAX_SLOTS, PROGRESS, USER_ERRORS, refuse, slider_scales

MODE_LABELS = {mode: label for label, mode in MODES.items()}


def _controls(state: AppState, res: int) -> dict:
    c = {"prompt": gr.Textbox(label="Prompt", lines=2, elem_id="compose-prompt", value=state.suggested_prompt()),
         "negative": gr.Textbox(label="Negative prompt", elem_id="compose-negative")}
    with gr.Row():
        c["seed"] = gr.Number(label="Seed (-1: random)", value=-1, precision=0, minimum=-1, maximum=MAX_SEED,
                              elem_id="compose-seed")
        c["scheduler"] = gr.Dropdown(list(SCHEDULERS), value=state.default_scheduler, label="Sampler",
                                     elem_id="compose-scheduler")
        c["steps"] = gr.Slider(1, MAX_STEPS, value=25, step=1, label="Steps", elem_id="compose-steps")
        c["guidance"] = gr.Slider(0, MAX_GUIDANCE, value=7.5, step=0.5, label="CFG scale", elem_id="compose-guidance")
    with gr.Row():
        c["width"] = gr.Slider(64, MAX_SIDE, value=res, step=8, label="Width", elem_id="compose-width")
        c["height"] = gr.Slider(64, MAX_SIDE, value=res, step=8, label="Height", elem_id="compose-height")
    c["mode"] = gr.Radio(list(MODES), value=next(iter(MODES)), label="Mode (weighted sum: the Generate tab's "
                         "sliders)", elem_id="compose-mode")
    names = list(state.compose.moles)
    # allow_custom_value: the API checks names against the files loaded now (Compositions.check), not those of the
    # first paint
    c["mole"] = gr.Dropdown(names, value=names[0] if names else None, label="MoLE file", elem_id="compose-mole",
                            allow_custom_value=True)
    experts = state.compose.experts(names[0]) if names else []  # a --mole file's experts from the first paint
    c["scales"], c["masks"] = [], []
    for i in range(MAX_EXPERTS):
        name = experts[i] if i < len(experts) else f"expert {i}"
        with gr.Row():
            c["scales"].append(gr.Slider(SCALE_MIN, SCALE_MAX, value=1.0, step=0.05, visible=i < len(experts),
                                         label=f"{name} extra scale", elem_id=f"expert-scale-{i}"))
            c["masks"].append(gr.Checkbox(label=f"mask {name}", visible=i < len(experts), elem_id=f"expert-mask-{i}",
                                          scale=0))
    c["go"] = gr.Button("Generate", variant="primary", elem_id="compose-generate")
    c["message"] = gr.Markdown(elem_id="compose-message")
    return c


def _expert_updates(state: AppState, name: str | None, scales=None, masked=()) -> list:
    """Scale slider and mask box per expert slot: the chosen MoLE file's experts, the rest hidden."""
    experts = state.compose.experts(name)[:MAX_EXPERTS] if name in state.compose.moles else []
    scales = scales or {}
    sliders = [gr.update(visible=i < len(experts), label=f"{experts[i]} extra scale" if i < len(experts) else None,
                         value=scales.get(experts[i], 1.0) if i < len(experts) else 1.0) for i in range(MAX_EXPERTS)]
    masks = [gr.update(visible=i < len(experts), label=f"mask {experts[i]}" if i < len(experts) else None,
                       value=i < len(experts) and experts[i] in masked) for i in range(MAX_EXPERTS)]
    return sliders + masks


def _settings(state: AppState, name, values) -> Settings:
    """The MoLE settings from the expert slots: values = MAX_EXPERTS scales then MAX_EXPERTS mask boxes."""
    if not name:
        return Settings("")
    experts = state.compose.experts(name)[:MAX_EXPERTS]
    scales, masks = values[:MAX_EXPERTS], values[MAX_EXPERTS:2 * MAX_EXPERTS]
    return Settings(name, {e: float(s) for e, s in zip(experts, scales, strict=False)},
                    [e for e, m in zip(experts, masks, strict=False) if m])


def _generate_handler(state: AppState):
    def generate(prompt, negative, seed, steps, guidance, width, height, scheduler, mode, mole, *values,
                 progress=PROGRESS):
        experts, slots = values[:2 * MAX_EXPERTS], values[2 * MAX_EXPERTS:]
        try:
            request = GenerationRequest(prompt, negative, seed, steps, guidance, width, height, 1, scheduler,
                                        slider_scales(state, slots), mole=_settings(state, mole, experts))
            saved = generate_composed(state, request, MODES.get(mode, mode),
                                      lambda done, total: progress((done, total), desc="denoising"))
            heatmap = state.compose.heatmap() if MODES.get(mode, mode) != "sum" else gr.skip()
        except USER_ERRORS as err:
            return gr.skip(), gr.skip(), gr.skip(), refuse(err), state.status_text()
        gallery = [(str(s.path), s.label) for s in saved]
        return gallery, "\n\n".join(s.infotext for s in saved), heatmap, "", state.status_text()
    return generate


def _paste_handler(state: AppState, c: dict, L: dict):
    """A layout image's text fills the layout (method, slots); any other fills the mode and MoLE or sum widgets."""
    def paste(text):
        try:
            req, mode, layout = paste_layout(state, text or "")
        except USER_ERRORS as err:
            return [gr.skip()] * (12 + 2 * MAX_EXPERTS + MAX_SLOTS + LAYOUT_SLOTS * len(SLOT_FIELDS)) + [refuse(err)]
        fields = [req.prompt, req.negative_prompt, req.seed, req.steps, req.guidance, req.width, req.height,
                  req.scheduler, MODE_LABELS[mode] if mode in MODE_LABELS else gr.skip()]
        mole = req.mole.file if req.mole else gr.skip()
        experts = (_expert_updates(state, req.mole.file, req.mole.scales, req.mole.masked) if req.mole
                   else [gr.skip()] * (2 * MAX_EXPERTS))
        slots = [gr.update(value=req.scales[n]) if n in req.scales else gr.skip()
                 for n in state.fusion.names()[:MAX_SLOTS]]
        slots += [gr.skip()] * (MAX_SLOTS - len(slots))
        method = layout.label if layout else gr.skip()
        press = "Generate with the layout" if layout else "Generate"
        return [*fields, gr.update(choices=list(state.compose.moles), value=mole), *experts, *slots, method,
                *layout_updates(layout, state.fusion.names()), gr.skip(),
                f"Parameters applied ({mode}): press {press} to reproduce the image"]
    return paste


def _mole_files(state: AppState, c: dict):
    with gr.Accordion("MoLE files", open=False):
        c["available"] = gr.Dropdown(label="MoLE files in the app's folders", elem_id="mole-available")
        c["path"] = gr.Textbox(label="…or a path inside them (mole.safetensors or its folder)", elem_id="mole-path")
        with gr.Row():
            c["load"] = gr.Button("Load MoLE file", elem_id="mole-load")
            c["refresh"] = gr.Button("Refresh list", elem_id="mole-refresh")

    def refresh():
        names = [n for n in state.compose.available() if n not in state.compose.moles]
        return gr.update(choices=names, value=names[0] if names else None)

    def load(name, path):
        try:
            loaded = state.compose.load(path.strip()) if (path or "").strip() else state.compose.load_available(name)
        except USER_ERRORS as err:
            return [gr.skip()] * (1 + 2 * MAX_EXPERTS) + [refuse(err), gr.skip()]
        return [gr.update(choices=list(state.compose.moles), value=loaded), *_expert_updates(state, loaded),
                f"Loaded MoLE **{loaded}** (experts: {', '.join(state.compose.experts(loaded))})", refresh()]

    c["refresh"].click(refresh, outputs=c["available"], api_visibility="private")
    c["load"].click(load, inputs=[c["available"], c["path"]],
                    outputs=[c["mole"], *c["scales"], *c["masks"], c["message"], c["available"]], api_name="load_mole",
                    concurrency_id="adapters")
    return refresh


def _gate_training(state: AppState, c: dict, res: int):
    with gr.Accordion("Train gates for loaded adapters (MoLE)", open=False) as accordion:
        g = {"experts": gr.CheckboxGroup(state.fusion.names(), label="Experts (2 to 8 loaded adapters)",
                                         elem_id="gate-experts")}
        g["photos"] = gr.Textbox(label="Photo folder of each expert, one a line (filled from the adapters)", lines=2,
                                 elem_id="gate-photos")
        g["prompts"] = gr.Textbox(label="Prompt of each expert, one a line", lines=2, elem_id="gate-prompts")
        with gr.Row():
            g["steps"] = gr.Number(label="Steps", value=200, precision=0, elem_id="gate-steps")
            g["resolution"] = gr.Number(label="Resolution", value=res, precision=0, elem_id="gate-resolution")
            g["start"] = gr.Button("Train gates", variant="primary", elem_id="gate-start")
            g["cancel"] = gr.Button("Cancel", variant="stop", elem_id="gate-cancel")
        g["status"] = gr.Markdown(elem_id="gate-status")
        g["loss"] = gr.Image(label="Loss", type="pil", elem_id="gate-loss", height=200)
        g["timer"] = gr.Timer(1.0, active=False)

    def fill(names):
        defaults = [expert_defaults(state.loaded_adapters()[n]) for n in names or [] if n in state.loaded_adapters()]
        return "\n".join(d[0] for d in defaults), "\n".join(d[1] for d in defaults)

    def start(names, photos, prompts, steps, resolution):
        try:
            job = start_gate_training(state, GateSettings(list(names or []), (photos or "").splitlines(),
                                                          (prompts or "").splitlines(), steps, resolution or None))
        except USER_ERRORS as err:
            return refuse(err), gr.Timer(active=False)
        return f"Started: `{job.output_dir.name}`", gr.Timer(active=True)

    def poll():
        job = state.training.job
        if job is None or job.kind != "gates":
            return gr.skip(), gr.skip(), gr.Timer(active=False), gr.skip(), *[gr.skip()] * (2 * MAX_EXPERTS)
        p = job.progress()
        text = f"**{p.state}** · step {p.step}/{p.total or '?'}" + (f" · {p.message}" if p.message else "")
        mole, experts = gr.skip(), [gr.skip()] * (2 * MAX_EXPERTS)
        try:
            new = register_finished_gates(state)
        except USER_ERRORS as err:
            new, text = None, text + "\n\n" + refuse(err)
        if new:
            text += f"\n\nMoLE **{new}** loaded: choose the MoLE mode and Generate."
            mole = gr.update(choices=list(state.compose.moles), value=new)
            experts = _expert_updates(state, new)
        return text, loss_curve_image(p.losses), gr.Timer(active=p.state == "running"), mole, *experts

    # Adapters loaded or trained since the page was drawn are offered when the panel opens.
    accordion.expand(lambda: gr.update(choices=state.fusion.names()), outputs=g["experts"], api_visibility="private")
    g["experts"].change(fill, inputs=g["experts"], outputs=[g["photos"], g["prompts"]], api_visibility="private")
    g["start"].click(start, inputs=[g["experts"], g["photos"], g["prompts"], g["steps"], g["resolution"]],
                     outputs=[g["status"], g["timer"]], api_name="train_gates", concurrency_id="training")
    g["timer"].tick(poll, outputs=[g["status"], g["loss"], g["timer"], c["mole"], *c["scales"], *c["masks"]],
                    concurrency_id="training", show_progress="hidden", api_visibility="private")
    g["cancel"].click(lambda: state.training.cancel() or "Cancelled.", outputs=g["status"],
                      api_name="cancel_gate_training", concurrency_id="training")
    return g


def _export(state: AppState, c: dict):
    with gr.Accordion("Export the MoLE composition (static: gates averaged per block)", open=False):
        target = gr.Radio(list(EXPORT_TARGETS), value=next(iter(EXPORT_TARGETS)), label="Format",
                          elem_id="mole-export-target")
        dtype = gr.Dropdown(list(EXPORT_DTYPES), value="fp16", label="Precision", elem_id="mole-export-dtype")
        prompts = gr.Textbox(label="Prompts to average the gates over, one a line (empty: the experts' trigger "
                             "prompts)", lines=2, elem_id="mole-export-prompts")
        button = gr.Button("Export", variant="primary", elem_id="mole-export")
        message = gr.Markdown(elem_id="mole-export-message")
        file = gr.File(label="Download", elem_id="mole-export-file")

    def run(mole, label, precision, lines, *values, progress=PROGRESS):
        progress(None, desc="averaging the gates and folding them")
        try:
            path = export_mole(state, _settings(state, mole, values), EXPORT_TARGETS[label], precision,
                               (lines or "").splitlines())
        except USER_ERRORS as err:
            return gr.skip(), refuse(err)
        return str(path), f"Wrote `{path.name}` ({path.stat().st_size / 2**20:.1f} MiB)"

    button.click(run, inputs=[c["mole"], target, dtype, prompts, *c["scales"], *c["masks"]], outputs=[file, message],
                 api_name="export_mole", concurrency_id="export")


def compose_tab(state: AppState, slots: list, res: int, demo: gr.Blocks, status) -> dict:
    """Builds the tab inside the current gr.Tab; `slots`: the Generate tab's adapter sliders (the sum mode);
    `status`: the header, which shows each generation's count."""
    gr.Markdown("Compose several subjects: **weighted sum** (the Generate tab's sliders, fused into the weights) or "
                "**MoLE** (learned gates choose the expert per block; mask an expert or give it an extra scale). "
                "*Compare* shows base, sum and MoLE for the same seed. The **layout** below places each subject "
                "(a region per expert) and exports the composition for ComfyUI and A1111.")
    with gr.Row():
        with gr.Column(scale=3):
            c = _controls(state, res)
            refresh = _mole_files(state, c)
            gates = _gate_training(state, c, res)
            _export(state, c)
            with gr.Accordion("Paste parameters (from a PNG made here)", open=False):
                c["paste"] = gr.Textbox(label="Parameters text", lines=3, elem_id="compose-paste")
                c["apply"] = gr.Button("Apply", elem_id="compose-apply")
        with gr.Column(scale=4):
            c["gallery"] = gr.Gallery(label="Images", columns=3, format="png", elem_id="compose-gallery", height=360)
            c["infotext"] = gr.Textbox(label="Parameters (also stored in each PNG)", lines=4,
                                       elem_id="compose-infotext")
            with gr.Row():
                c["layout_masks"] = gr.Gallery(label="Regions each expert used (its mask over the image)", columns=2,
                                               elem_id="layout-masks", height=260)
                c["heatmap"] = gr.Image(label="Gate weights of the last MoLE prompt (block x expert)", type="pil",
                                        elem_id="compose-heatmap", height=260)
    L = layout_panel(state)  # full width: one row per expert
    fields = [c[k] for k in ("prompt", "negative", "seed", "steps", "guidance", "width", "height", "scheduler")]
    c["go"].click(_generate_handler(state), inputs=[*fields, c["mode"], c["mole"], *c["scales"], *c["masks"], *slots],
                  outputs=[c["gallery"], c["infotext"], c["heatmap"], c["message"], status], api_name="compose",
                  concurrency_id="generate")
    c["mole"].change(lambda name: _expert_updates(state, name), inputs=c["mole"], outputs=[*c["scales"], *c["masks"]],
                     api_visibility="private")
    c["slots"] = slots
    wire_layout(state, c, L, lambda mole, values: _settings(state, mole, values), status)
    c["apply"].click(_paste_handler(state, c, L), inputs=c["paste"],
                     outputs=[*fields, c["mode"], c["mole"], *c["scales"], *c["masks"], *slots, L["method"],
                              *slot_inputs(L), c["paste"], c["message"]], api_visibility="private")
    # A page (re)load shows what is loaded now: MoLE files trained or loaded since, adapters for the gates.
    demo.load(lambda: [gr.update(choices=list(state.compose.moles)), refresh(),
                       gr.update(choices=state.fusion.names())]
              + [gr.update(choices=state.fusion.names())] * LAYOUT_SLOTS,
              outputs=[c["mole"], c["available"], gates["experts"], *L["slots"]["adapter"]], api_visibility="private")
    return c
