"""The subject-quality options of the Train tab (prior source, pivotal tuning, masked loss): each reaches the
trainer's TrainConfig through the app's command line, bad input is refused in one line before the job starts,
uploaded masks are staged as masks, and the model card of a pivotal run says how to use its embedding."""

import os

import pytest
from PIL import Image
from test_app_training import _wait, state  # noqa: F401  (the module's AppState fixture with its stand-in trainer)
from training_helpers import make_photos, run_training, tiny_config

from moslora_diffusion.app.training_jobs import TrainingError, TrainingSettings, build_command
from moslora_diffusion.app.trigger_words import guess_trigger_word
from moslora_diffusion.app.ui import trigger_placeholder
from moslora_diffusion.app.uploads import UploadError, stage_uploads
from moslora_diffusion.data import scan_photos
from moslora_diffusion.files.safetensors_io import load_tensors
from moslora_diffusion.training.run_folder.outputs import model_card
from moslora_diffusion.training.settings.config import parse_args


def _config(settings: TrainingSettings, tmp_path):
    """The TrainConfig the trainer builds from the app's command line."""
    settings.check()
    return parse_args(build_command("assets/toy-base", settings, tmp_path / "run")[2:])


def test_each_new_control_reaches_the_trainers_config(tmp_path):
    chosen = TrainingSettings(tmp_path / "photos", "a photo of sks dog", "a photo of a dog", 40,
                              prior_source="base_model", pivotal=True, masked_loss=True)
    config = _config(chosen, tmp_path)
    assert (config.with_prior_preservation, config.class_prompt, config.prior_source, config.class_data_dir) == (
        True, "a photo of a dog", "base_model", None)  # no class images: no class folder either
    assert (config.train_text_encoder_ti, config.token_abstraction, config.masked_loss) == (True, "sks", True)

    typed = TrainingSettings(tmp_path / "photos", "a photo of zorb dog", "a photo of a dog", 40, pivotal=True,
                             trigger_word=" zorb ")
    config = _config(typed, tmp_path)
    assert (config.resolved_prior_source, config.token_abstraction, config.masked_loss) == ("class_images", "zorb",
                                                                                          False)
    assert config.class_data_dir == str(tmp_path / "run-class-images")  # generated class images, as before

    plain = _config(TrainingSettings(tmp_path / "photos", "a photo of sks dog", "", 40, prior_source="base_model"),
                    tmp_path)
    assert (plain.with_prior_preservation, plain.train_text_encoder_ti, plain.token_abstraction,
            plain.masked_loss) == (False, False, None, False)  # the source only applies with a class prompt


@pytest.mark.parametrize(("instance", "class_prompt", "word"), [
    ("a photo of sks dog", "a photo of a dog", "sks"),  # the one word the class prompt lacks
    ("a photo of Zorb cat", "a photo of cat", "Zorb"),  # as written in the prompt
    ("a photo of sks dog", "", "sks"),  # a usual identifier, alone
    ("an ohwx man, smiling", "a man", "ohwx"),  # several words added: the identifier among them
    ("a photo of my dog", "", ""),  # nothing obvious: the user types it
    ("a photo of sks ohwx dog", "", ""),  # two identifiers: not obvious
    ("a photo of zorb dog", "a photo of a cat", ""),  # two words added, none a usual identifier
])
def test_the_trigger_word_is_guessed_only_when_obvious(instance, class_prompt, word):
    assert guess_trigger_word(instance, class_prompt) == word
    placeholder = trigger_placeholder(instance, class_prompt)  # what the Train tab's empty box says
    assert placeholder == (f"empty: {word}" if word else "required: the rare word of the instance prompt, e.g. sks")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"pivotal": True, "trigger_word": "cat"}, "'cat' does not appear in --instance_prompt 'a photo of zorb dog'"),
    ({"pivotal": True}, "pivotal tuning needs the trigger word: type the rare word of the instance prompt"),
    ({"pivotal": True, "trigger_word": "two words"}, "must be one word without spaces"),
    ({"prior_source": "regularisation"}, "prior preservation source must be one of ['class_images', 'base_model']"),
])
def test_bad_new_settings_are_refused_in_one_line(tmp_path, overrides, message):
    settings = TrainingSettings(tmp_path, "a photo of zorb dog", **overrides)
    with pytest.raises(TrainingError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        settings.check()
    assert "\n" not in str(err.value)


def _upload(folder, name, image):
    """A file as Gradio hands it over: each upload in a folder of its own."""
    folder.mkdir(parents=True)
    image.save(folder / name)
    return folder / name


def test_uploaded_masks_land_beside_their_photo_as_masks(tmp_path):
    dog = _upload(tmp_path / "u1", "dog.png", Image.new("RGB", (64, 48), (200, 30, 30)))
    mask = _upload(tmp_path / "u2", "dog_mask.png", Image.new("L", (64, 48), 255))
    cat = _upload(tmp_path / "u3", "cat.jpg", Image.new("RGB", (64, 64), (30, 30, 200)))
    stray = _upload(tmp_path / "u4", "halloween_mask.png", Image.new("RGB", (64, 64), (0, 200, 0)))
    staged = stage_uploads([mask, dog, cat, stray], tmp_path / "staged")
    assert sorted(os.listdir(tmp_path / "staged")) == ["photo_000.png", "photo_000_mask.png", "photo_001.jpg",
                                                       "photo_002.png"]
    assert [name for name, _ in staged.photos] == ["dog.png", "cat.jpg", "halloween_mask.png"]  # no photo: a photo
    assert (tmp_path / "staged" / "photo_000_mask.png").read_bytes() == mask.read_bytes()
    scan = scan_photos(tmp_path / "staged", "a photo of sks dog")  # what the trainer reads
    assert [r.path.name for r in scan.records] == ["photo_000.png", "photo_001.jpg", "photo_002.png"]
    assert [p.name for p in scan.masks] == ["photo_000_mask.png"]
    assert staged.uploaded_names()["photo_000_mask.png"] == "dog_mask.png"


def test_a_missing_or_bad_mask_is_named_before_the_job_starts(state, tmp_path):  # noqa: F811
    dog = _upload(tmp_path / "u1", "dog.png", Image.new("RGB", (64, 64), (200, 30, 30)))
    mask = _upload(tmp_path / "u2", "dog_mask.png", Image.new("L", (64, 64), 255))
    cat = _upload(tmp_path / "u3", "cat.jpg", Image.new("RGB", (64, 64), (30, 30, 200)))
    small = _upload(tmp_path / "u4", "cat_mask.png", Image.new("L", (16, 64), 255))
    uploads_dir, job_before = state.outputs / "uploads", state.training.job
    staged_before = set(os.listdir(uploads_dir)) if uploads_dir.exists() else set()
    cases = [([dog, mask, cat], "masked loss: no mask for cat.jpg: upload a <name>_mask.png with each photo"),
             ([dog, mask, cat, small], "masked loss: mask cat_mask.png is 16x64 but its photo is 64x64"),
             ([dog, cat], "no mask for dog.png, cat.jpg")]
    for files, message in cases:
        with pytest.raises(UploadError, match=message.replace(".", r"\.")) as err:
            state.start_training("a photo of sks dog", steps=1, uploads=[str(f) for f in files], masked_loss=True)
        assert "\n" not in str(err.value) and "photo_0" not in str(err.value)  # the user's names, not ours
    with pytest.raises(UploadError, match=r"no mask for 0\.png, 1\.png: put a <name>_mask\.png beside each photo"):
        state.start_training("a photo of sks dog", steps=1, folder="photos/dog", masked_loss=True)
    assert state.training.job is job_before  # no job started
    assert set(os.listdir(uploads_dir)) == staged_before  # the refused runs' staged copies are gone again

    black = _upload(tmp_path / "u5", "cat_mask.png", Image.new("L", (64, 64), 0))  # no subject: would train nothing
    with pytest.raises(UploadError, match=r"^masked loss: the mask cat_mask\.png marks no subject"):
        state.start_training("a photo of sks dog", steps=1, uploads=[str(f) for f in (dog, mask, cat, black)],
                             masked_loss=True)
    subject = Image.new("L", (64, 64), 0)
    subject.paste(255, (16, 16, 48, 48))
    good = _upload(tmp_path / "u6", "cat_mask.png", subject)
    job = state.start_training("a photo of sks dog", steps=1, uploads=[str(f) for f in (dog, mask, cat, good)],
                               masked_loss=True, pivotal=True)
    _wait(job)
    assert job.progress().state == "finished" and "--masked_loss" in job.cmd
    assert job.cmd[job.cmd.index("--token_abstraction") + 1] == "sks"
    photos_dir = job.cmd[job.cmd.index("--instance_data_dir") + 1]
    assert sorted(os.listdir(photos_dir)) == ["photo_000.png", "photo_000_mask.png", "photo_001.jpg",
                                              "photo_001_mask.png"]
    state.register_finished_training()


def _captioned_masked_photos(folder):
    make_photos(folder, count=2)
    for i in range(2):
        Image.new("L", (40, 48), 255).save(folder / f"photo_{i}_mask.png")
        (folder / f"photo_{i}.txt").write_text(f"a photo of sks dog, photo {i}, outdoors\n")
    return folder


def test_the_model_card_of_a_pivotal_run_says_how_to_use_the_embedding(tiny_sd15_dir, tmp_path):
    """A real 2-step run (pivotal tuning, masked loss, varied captions): the card names the word and the embedding
    file the run wrote, with the A1111, ComfyUI and diffusers instructions, and the masked-loss and caption rows."""
    photos = _captioned_masked_photos(tmp_path / "photos")
    out = tmp_path / "run"
    run_training(tiny_config(tiny_sd15_dir, photos, out, train_text_encoder_ti=True, token_abstraction="sks",
                             embedding_lr=5e-2, masked_loss=True, caption_dropout_rate=0.25, shuffle_caption=True,
                             keep_tokens=1))
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| pivotal tuning | yes (trigger word `sks`, embedding learning rate 0.05) |" in card
    assert "| masked loss | yes (each photo's `<name>_mask.png` or alpha channel weights the loss) |" in card
    assert "| captions | dropout 0.25, shuffled (first 1 parts kept in place) |" in card
    assert "- `sks.safetensors`: the trigger word `sks`'s learned embedding" in card
    assert set(load_tensors(out / "sks.safetensors")[0]) == {"emb_params"}  # the file the card names exists
    table = card[card.index("| file | what it is | AUTOMATIC1111 | ComfyUI |"):].split("\n\n")[0].splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| `lora_kohya.safetensors`", "| `sks.safetensors`"]
    assert "copy into `embeddings/`" in table[3] and "write `embedding:sks` in the prompt" in table[3]
    assert "copy into `models/Lora/`, add `<lora:lora_kohya:1>`" in table[2]
    assert "copy both files below; the LoRA alone does not draw the subject" in card
    assert f'pipe.load_textual_inversion("{out}/sks.safetensors", token="sks")' in card


def test_a_plain_card_has_no_pivotal_masked_or_caption_rows_and_sdxl_loads_both_encoders(tmp_path):
    plan = {"family": "sd1", "prediction_type": "epsilon", "resolution": 512, "effective_batch": 1}
    plain = model_card(tiny_config(tmp_path, tmp_path, tmp_path / "run"), plan, {"steps": 2}, [])
    assert not any(word in plain for word in ("pivotal", "masked loss", "| captions", "embedding"))
    assert "| mixer init | kaiming |" in plain
    # a plain LoRA has no mixer: its card said "identity" (the adapter's internal stand-in) whatever was given
    lora = model_card(tiny_config(tmp_path, tmp_path, tmp_path / "run", adapter="lora", mixer_init="orthogonal"),
                      plan, {"steps": 2}, [])
    assert "| mixer init | none (plain LoRA) |" in lora and "identity" not in lora
    sdxl = tiny_config(tmp_path, tmp_path, tmp_path / "run", train_text_encoder_ti=True, token_abstraction="sks")
    card = model_card(sdxl, {**plan, "family": "sdxl"}, {"steps": 2}, [])
    assert ('pipe.load_textual_inversion(state["clip_g"], token="sks", text_encoder=pipe.text_encoder_2, '
            'tokenizer=pipe.tokenizer_2)') in card and "StableDiffusionXLPipeline" in card


def test_the_model_cards_diffusers_snippet_runs_on_this_machine(tiny_sd15_dir, tmp_path, monkeypatch):
    """The card's diffusers block, run as a user would paste it (here: a CPU, the installed diffusers): no
    hard-coded CUDA or fp16, no argument that diffusers deprecates (a deprecation warning fails the test); it
    loads the LoRA and the trigger word's embedding and draws."""
    import warnings

    out = tmp_path / "run"
    run_training(tiny_config(tiny_sd15_dir, make_photos(tmp_path / "photos"), out, train_text_encoder_ti=True,
                             token_abstraction="sks"))
    card = (out / "README.md").read_text(encoding="utf-8")
    snippet = card.split("```python\n")[1].split("```")[0]
    assert '.to("cuda")' not in snippet and "torch_dtype" not in snippet
    from diffusers import StableDiffusionPipeline

    calls = []
    real_call = StableDiffusionPipeline.__call__

    def two_steps(self, prompt, **kwargs):  # 2 denoising steps instead of 50: the same code path, faster
        calls.append(prompt)
        return real_call(self, prompt, num_inference_steps=2)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", two_steps)
    scope = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # diffusers' deprecate() warns with FutureWarning
        exec(compile(snippet, "model card", "exec"), scope)  # noqa: S102 - the card's own text, written above
    assert calls == ["a photo of sks dog"] and scope["image"].size[0] > 0
    assert scope["pipe"].device.type == ("cuda" if scope["torch"].cuda.is_available() else "cpu")
