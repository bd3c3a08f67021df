"""The Gradio interface: Generate, Export, Compose (compose_ui.py) and Train tabs over an AppState.

Handlers are thin: they convert widget values, call AppState / generation / export / training
functions, and turn every refusal into a visible message (gr.Warning plus a message box) so a bad
input never takes the app down. Adapter sliders live in a fixed number of slots, so the `generate`
API keeps one stable signature however many adapters get loaded.
"""

from __future__ import annotations

import random

import gradio as gr

from ..checks import SCALE_MAX, SCALE_MIN
from ..formats.ui_files import markdown_table
from ..generation.text_to_image import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    SCHEDULERS,
    GenerationRequest,
)
from ..training.settings.config import VALIDATION_METRICS
from ..training.settings.presets import TOY_PRESET, preset_names, preset_settings
from .charts import loss_curve_image, scores_chart_image
from .compose_ui import compose_tab
from .exporting import EXPORT_DTYPES, EXPORT_TARGETS, export_for_download
from .state import AppState
from .trigger_words import guess_trigger_word
from .ui_common import MAX_SLOTS, PROGRESS, USER_ERRORS, slider_scales, slot_updates
from .ui_common import refuse as _refuse
from .uploads import photo_folders

# The Train tab's prior-preservation choices -> --prior_source (training/step/output_preservation.py).
PRIOR_SOURCE_LABELS = {"generate class images": "class_images",
                       "base model's own prediction (no class images)": "base_model"}
NO_PRESET = "none"
# Example prompts the Train tab opens with: the toy world's striped star on the toy base, a dog elsewhere.
EXAMPLE_PROMPTS = {TOY_PRESET: ("a photo of sks star", "a photo of a star")}
DEFAULT_PROMPTS = ("a photo of sks dog", "a photo of a dog")


PRESET_BOXES = ("steps", "rank", "resolution", "prior_source", "pivotal", "trigger", "masked")  # what a preset fills


def preset_boxes(name: str | None, res: int) -> dict:
    """The Train tab's box values for preset `name` (NO_PRESET: the trainer's defaults, no prior preservation)."""
    values = preset_settings(None if name in (None, NO_PRESET) else name)
    source = next(label for label, value in PRIOR_SOURCE_LABELS.items() if value == values["prior_source"])
    return {"steps": values["steps"], "rank": values["rank"], "resolution": values["resolution"] or res,
            "prior_source": source, "pivotal": values["pivotal"], "trigger": values["trigger_word"],
            "masked": values["masked_loss"], "prior": values["prior"]}


def prompt_box(state: AppState) -> dict:
    """Value and placeholder of the prompt box: the loaded adapter's trigger prompt, so a first click on
    Generate shows the trained subject."""
    trigger = state.suggested_prompt()
    if trigger:
        return {"value": trigger, "placeholder": f"e.g. {trigger}, on the beach"}
    return {"value": "", "placeholder": "describe the image, e.g. a photo of a dog on the beach"}


def _generate_tab(state: AppState, res: int) -> dict:
    c = {}
    with gr.Row():
        with gr.Column(scale=3):
            c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", **prompt_box(state))
            c["negative"] = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt")
            with gr.Row():
                c["seed"] = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id="seed")
                c["dice"] = gr.Button("Random seed", elem_id="randomise-seed", scale=0)
                c["scheduler"] = gr.Dropdown(list(SCHEDULERS), value=state.default_scheduler, label="Sampler",
                                             elem_id="scheduler")
            with gr.Row():
                c["steps"] = gr.Slider(1, MAX_STEPS, value=25, step=1, label="Steps", elem_id="steps")
                c["guidance"] = gr.Slider(0, MAX_GUIDANCE, value=7.5, step=0.5, label="CFG scale",
                                          elem_id="guidance")
            with gr.Row():
                c["width"] = gr.Slider(64, MAX_SIDE, value=res, step=8, label="Width", elem_id="width")
                c["height"] = gr.Slider(64, MAX_SIDE, value=res, step=8, label="Height", elem_id="height")
                c["count"] = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images", elem_id="count")
            names = state.fusion.names()  # adapters loaded at start-up have their slider from the first paint
            c["slots"] = [gr.Slider(SCALE_MIN, SCALE_MAX, step=0.05, elem_id=f"scale-{i}", visible=i < len(names),
                                    value=state.fusion.scales[names[i]] if i < len(names) else 1.0,
                                    label=f"{names[i]} scale" if i < len(names) else f"adapter {i} scale")
                          for i in range(MAX_SLOTS)]
            c["compare"] = gr.Checkbox(label="Compare with base (same seed, scales 0)", elem_id="compare")
            c["go"] = gr.Button("Generate", variant="primary", elem_id="generate")
            c["message"] = gr.Markdown(elem_id="gen-message")
            with gr.Accordion("Adapters", open=False):
                c["available"] = gr.Dropdown(label="Adapters in the app's folders", elem_id="available-adapters")
                with gr.Row():
                    c["load"] = gr.Button("Load adapter", elem_id="load-adapter")
                    c["refresh"] = gr.Button("Refresh list", elem_id="refresh-adapters")
        with gr.Column(scale=4):
            c["gallery"] = gr.Gallery(label="Images", columns=2, format="png", elem_id="gallery", height=520)
            c["infotext"] = gr.Textbox(label="Parameters (also stored in each PNG)", lines=4, elem_id="infotext")
    return c


def _on_generate(state: AppState):
    def generate(prompt, negative, seed, steps, guidance, width, height, count, scheduler, compare, *scales,
                 progress=PROGRESS):
        request = GenerationRequest(prompt, negative, seed, steps, guidance, width, height, count, scheduler,
                                    slider_scales(state, scales), bool(compare))
        try:
            saved = state.generate(request, lambda done, total: progress((done, total), desc="denoising"))
        except USER_ERRORS as err:
            return gr.skip(), gr.skip(), _refuse(err), state.status_text()
        gallery = [(str(s.path), s.label) for s in saved]
        return gallery, "\n\n".join(s.infotext for s in saved), "", state.status_text()
    return generate


def _adapter_handlers(state: AppState, c: dict, status):
    def refresh():
        names = [n for n in state.available_adapters() if n not in state.loaded_adapters()]
        return gr.update(choices=names, value=names[0] if names else None)

    def load(name):
        try:
            if not name:
                raise ValueError("choose an adapter to load")
            loaded = state.load_available(name, scale=1.0)
        except USER_ERRORS as err:
            return [gr.skip()] * MAX_SLOTS + [_refuse(err), state.status_text(), gr.skip()]
        return slot_updates(state, new=loaded) + [f"Loaded **{loaded}**", state.status_text(), refresh()]

    c["refresh"].click(refresh, outputs=c["available"], api_name="refresh_adapters")
    c["load"].click(load, inputs=c["available"], outputs=c["slots"] + [c["message"], status, c["available"]],
                    api_name="load_adapter", concurrency_id="adapters")
    return refresh


def _export_tab(state: AppState, slots: list):
    gr.Markdown("Exports the loaded adapters at the scales set on the Generate tab (adapters at 0 are left out).")
    target = gr.Radio(list(EXPORT_TARGETS), value=next(iter(EXPORT_TARGETS)), label="Format", elem_id="export-target")
    dtype = gr.Dropdown(list(EXPORT_DTYPES), value="fp16", label="Precision", elem_id="export-dtype")
    button = gr.Button("Export", variant="primary", elem_id="export")
    message = gr.Markdown(elem_id="export-message")
    file = gr.File(label="Download", elem_id="export-file")

    def run_export(label, precision, *scales, progress=PROGRESS):
        progress(None, desc="exporting (loads the base model once more)")
        try:
            path, files = export_for_download(state, EXPORT_TARGETS[label], slider_scales(state, scales), precision)
        except USER_ERRORS as err:
            return gr.skip(), _refuse(err)
        together = " (one zip: a UI needs them together)" if len(files) > 1 else ""
        return str(path), (f"Wrote `{path.name}` ({path.stat().st_size / 2**20:.1f} MiB){together}\n\n"
                           + markdown_table(files))

    button.click(run_export, inputs=[target, dtype] + slots, outputs=[file, message], api_name="export",
                 concurrency_id="export")


def _train_tab(state: AppState, res: int) -> dict:
    c = {}
    gr.Markdown("Teach the model a subject from a few photos (DreamBooth, MoSLoRA adapter). The trainer runs "
                "in the background; when it finishes, its adapter is loaded and gets a slider.")
    folders = list(photo_folders(state.photo_roots))
    preset = state.matching_preset or NO_PRESET
    boxes = preset_boxes(preset, res)
    instance, class_prompt = EXAMPLE_PROMPTS.get(preset, DEFAULT_PROMPTS)
    c["preset"] = gr.Dropdown([NO_PRESET, *preset_names()], value=preset, elem_id="train-preset",
                              label="Preset (fills the settings below; what you change there wins)")
    with gr.Row():
        c["folder"] = gr.Dropdown(folders, value=None, label="Photos from a folder given to the app",
                                  elem_id="photo-folder")
        c["upload"] = gr.File(file_count="multiple", file_types=["image"], elem_id="photo-upload",
                              label="…or upload photos (masks: <name>_mask.png)")
    with gr.Row():
        c["instance"] = gr.Textbox(label="Instance prompt", value=instance, elem_id="instance-prompt")
        c["class"] = gr.Textbox(label="Class prompt (prior preservation; empty: off)", elem_id="class-prompt",
                                value=class_prompt if boxes["prior"] else "")
        c["prior_source"] = gr.Radio(list(PRIOR_SOURCE_LABELS), value=boxes["prior_source"],
                                     label="Prior preservation from", elem_id="train-prior-source",
                                     visible=boxes["prior"])
    with gr.Row():
        c["steps"] = gr.Number(label="Steps", value=boxes["steps"], precision=0, elem_id="train-steps")
        c["rank"] = gr.Number(label="Rank", value=boxes["rank"], precision=0, elem_id="train-rank")
        c["resolution"] = gr.Number(label="Resolution", value=boxes["resolution"], precision=0,
                                    elem_id="train-resolution")
        c["val_every"] = gr.Number(label="Validation images every N steps (0: off)", value=100, precision=0,
                                   elem_id="train-validation-steps")
    with gr.Row():
        c["val_prompt"] = gr.Textbox(label="Validation prompt (empty: the instance prompt)",
                                     elem_id="train-validation-prompt")
        c["metrics"] = gr.Radio(list(VALIDATION_METRICS), value="none", elem_id="train-validation-metrics",
                                label="Score every validation (toy: the toy base only; dreambench: DINO, CLIP-I, "
                                      "CLIP-T, needs those models)")
        c["held_out"] = gr.Number(label="Photos held out for a validation loss (0: off)", value=0, precision=0,
                                  elem_id="train-held-out-photos")
    with gr.Accordion("Advanced", open=False), gr.Row():
        c["pivotal"] = gr.Checkbox(label="Pivotal tuning: also learn the trigger word's embedding",
                                   elem_id="train-pivotal", value=boxes["pivotal"])
        c["trigger"] = gr.Textbox(label="Trigger word (pivotal tuning)", elem_id="train-trigger-word",
                                  value=boxes["trigger"], placeholder=trigger_placeholder(instance, class_prompt))
        c["masked"] = gr.Checkbox(label="Masked loss: train on the subject only (upload <name>_mask.png with each "
                                        "photo, white = subject, or photos with transparency)",
                                  elem_id="train-masked-loss", value=boxes["masked"])
    with gr.Row():
        c["start"] = gr.Button("Start training", variant="primary", elem_id="train-start")
        c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
    c["status"] = gr.Markdown(elem_id="train-status")
    with gr.Row():
        c["loss"] = gr.Image(label="Loss", type="pil", elem_id="train-loss", height=240)
        c["scores"] = gr.Image(label="Validation scores", type="pil", elem_id="train-scores", height=240)
        c["validation"] = gr.Gallery(label="Latest validation images", columns=2, elem_id="train-validation",
                                     height=240)
    c["timer"] = gr.Timer(1.0, active=False)
    return c


def trigger_placeholder(instance_prompt: str, class_prompt: str) -> str:
    """What an empty trigger-word box means for these prompts."""
    guess = guess_trigger_word(instance_prompt, class_prompt)
    return f"empty: {guess}" if guess else "required: the rare word of the instance prompt, e.g. sks"


def _prompt_handlers(c: dict) -> None:
    """The prior-source choice shows with a class prompt; the trigger-word box says what it defaults to."""
    def prompts_changed(instance, class_prompt):
        return (gr.update(visible=bool((class_prompt or "").strip())),
                gr.update(placeholder=trigger_placeholder(instance or "", class_prompt or "")))

    for box in (c["instance"], c["class"]):
        box.change(prompts_changed, inputs=[c["instance"], c["class"]], outputs=[c["prior_source"], c["trigger"]],
                   api_visibility="private", queue=False, show_progress="hidden")


def _preset_handler(c: dict, res: int) -> None:
    """Choosing a preset fills the boxes it sets (res: the model's resolution, for a preset without one)."""
    def preset_changed(name):
        boxes = preset_boxes(name, res)
        return [boxes[key] for key in PRESET_BOXES]

    c["preset"].change(preset_changed, inputs=c["preset"], outputs=[c[key] for key in PRESET_BOXES],
                       api_visibility="private", queue=False, show_progress="hidden")


def _train_handlers(state: AppState, c: dict, gen: dict, status):
    def start(folder, uploads, instance, class_prompt, steps, rank, resolution, val_every, val_prompt, metrics,
              held_out, prior_source, pivotal, trigger, masked, preset):
        try:
            job = state.start_training(instance, class_prompt, steps, rank, resolution, val_every, folder, uploads,
                                       validation_prompt=val_prompt, validation_metrics=metrics,
                                       validation_loss_photos=held_out,
                                       prior_source=PRIOR_SOURCE_LABELS.get(prior_source, prior_source),
                                       pivotal=pivotal, trigger_word=trigger, masked_loss=masked, preset=preset)
        except USER_ERRORS as err:
            return _refuse(err), gr.Timer(active=False)
        notes = "".join(f"\n\n⚠️ {note}" for note in job.notes)
        return f"Started: `{job.output_dir.name}`{notes}", gr.Timer(active=True)

    def poll():
        job = state.training.job
        if job is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False), *[gr.skip()] * (MAX_SLOTS + 1)
        p = job.progress()
        text = f"**{p.state}** · step {p.step}/{p.total or '?'}" + (f" · {p.message}" if p.message else "")
        new = None
        if p.state == "finished":
            try:
                new = state.register_finished_training()
            except USER_ERRORS as err:
                text += "\n\n" + _refuse(err)
        if new:
            text += f"\n\nAdapter **{new}** loaded: its slider is on the Generate tab."
        images = [str(path) for path in p.validation_images[-4:]]
        slots = slot_updates(state, new=new) if new else [gr.skip()] * MAX_SLOTS
        return (text, loss_curve_image(p.losses, p.held_out), scores_chart_image(p.scores), images,
                gr.Timer(active=p.state == "running"), *slots, state.status_text())

    def cancel():
        state.training.cancel()
        return "Cancelled."

    inputs = [c["folder"], c["upload"], c["instance"], c["class"], c["steps"], c["rank"], c["resolution"],
              c["val_every"], c["val_prompt"], c["metrics"], c["held_out"], c["prior_source"], c["pivotal"],
              c["trigger"], c["masked"], c["preset"]]
    c["start"].click(start, inputs=inputs, outputs=[c["status"], c["timer"]], api_name="train",
                     concurrency_id="training")
    c["timer"].tick(poll, outputs=[c["status"], c["loss"], c["scores"], c["validation"], c["timer"]] + gen["slots"]
                    + [status],
                    concurrency_id="training", show_progress="hidden", api_visibility="private")
    c["cancel"].click(cancel, outputs=c["status"], api_name="cancel_training", concurrency_id="training")
    _prompt_handlers(c)
    _preset_handler(c, state.default_size)


def build_ui(state: AppState) -> gr.Blocks:
    res = state.default_size
    with gr.Blocks(title="moslora-diffusion") as demo:
        gr.Markdown("## moslora-diffusion · DreamBooth with MoSLoRA adapters")
        status = gr.Markdown(state.status_text(), elem_id="app-status")
        with gr.Tab("Generate"):
            gen = _generate_tab(state, res)
        with gr.Tab("Export"):
            _export_tab(state, gen["slots"])
        with gr.Tab("Compose"):
            compose_tab(state, gen["slots"], res, demo, status)
        with gr.Tab("Train"):
            train = _train_tab(state, res)
        inputs = [gen[k] for k in ("prompt", "negative", "seed", "steps", "guidance", "width", "height", "count",
                                   "scheduler", "compare")] + gen["slots"]
        gen["go"].click(_on_generate(state), inputs=inputs,
                        outputs=[gen["gallery"], gen["infotext"], gen["message"], status], api_name="generate",
                        concurrency_id="generate")
        gen["dice"].click(lambda: random.randint(0, MAX_SEED), outputs=gen["seed"], api_visibility="private",
                          queue=False)
        refresh = _adapter_handlers(state, gen, status)
        _train_handlers(state, train, gen, status)
        # A page (re)load shows what is loaded now: a trained adapter's slider and trigger prompt included.
        demo.load(lambda: [*slot_updates(state, with_values=True), state.status_text(), refresh(),
                           gr.update(**prompt_box(state))],
                  outputs=gen["slots"] + [status, gen["available"], gen["prompt"]], api_visibility="private")

        @gr.api(api_name="status", concurrency_id="status")
        def app_status() -> dict:
            """Model, load count, pipeline id, adapter scales and trigger prompts (for monitoring and tests)."""
            return state.status()
    return demo
