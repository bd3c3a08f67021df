"""Recipes of the quality benchmark: a variant is a name plus TrainConfig overrides on top of the benchmark's shared
settings (plus, optionally, the benchmark's own captions mode). Each ablation is the baseline plus one feature, so
its paired difference against the baseline (same seeds) measures that feature alone.

On the command line (benchmarks/quality.py):

    --recipe NAME key=value ...   define NAME as baseline + these overrides (a built-in NAME: that recipe + these)
    --set key=value ...           on top of every variant of the run

Keys are TrainConfig fields (`snr_gamma=5`, `train_text_encoder_ti=true`, `text_encoder_lr=none`) or `captions`
(prompt, scene, mixed). Values are parsed to the field's type; an unknown key, or a value of the wrong type, is a
one-line error before anything is trained. Overrides pass through to TrainConfig as they are, so a recipe can name
a field that a newer trainer adds.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

CAPTIONS = ("prompt", "scene", "mixed")  # the benchmark's caption modes (quality.py: instance_folder)
BASELINE = "baseline"


@dataclass(frozen=True)
class Recipe:
    name: str
    overrides: dict = field(default_factory=dict)  # TrainConfig field -> value, or a callable(shared settings)
    captions: str | None = None  # None: the benchmark's --captions
    about: str = ""

    def settings(self, shared: dict) -> dict:
        """The TrainConfig keyword arguments of this recipe: `shared` with the overrides applied."""
        resolved = {k: v(shared) if callable(v) else v for k, v in self.overrides.items()}
        return {**shared, **resolved}

    def describe(self, shared: dict) -> dict:
        """The overrides as values (callables resolved), for the results file and the report."""
        out = {k: v(shared) if callable(v) else v for k, v in self.overrides.items()}
        return out | ({"captions": self.captions} if self.captions else {})


def _te_lr_low(shared: dict) -> float:
    return shared["learning_rate"] / 10


# Caption dropout keeps the bare instance-prompt captions of the baseline (one change at a time): with a single
# caption, dropping it still trains the unconditional branch on the subject's photos, which classifier-free guidance
# subtracts at every step; scene captions would be a second change (measure them with --recipe NAME captions=scene).
BUILTIN: dict[str, Recipe] = {r.name: r for r in (
    Recipe(BASELINE, {}, about="today's defaults: MoSLoRA, kaiming mixer"),
    Recipe("lora", {"adapter": "lora", "mixer_init": "identity"}, about="plain LoRA (identity mixer, frozen)"),
    Recipe("base_model_prior", {"prior_source": "base_model", "class_data_dir": None},
           about="prior preservation against the base model's own prediction, no class images"),
    Recipe("pivotal", {"train_text_encoder_ti": True, "token_abstraction": "sks"},
           about="pivotal tuning: the embedding of the trigger word sks is learned too"),
    Recipe("masked", {"masked_loss": True}, about="loss only inside each photo's subject mask (<stem>_mask.png)"),
    Recipe("caption_dropout", {"caption_dropout_rate": 0.1},
           about="10% of captions dropped (bare instance-prompt captions, as the baseline)"),
    Recipe("min_snr", {"snr_gamma": 5.0}, about="Min-SNR loss weighting, gamma 5"),
    Recipe("te_lr_low", {"text_encoder_lr": _te_lr_low}, about="text-encoder adapters at a tenth of the learning rate"),
    Recipe("orthogonal", {"mixer_init": "orthogonal"}, about="MoSLoRA with an orthogonal mixer init"),
)}
# What a run trains unless --variants says otherwise: the baseline, plain LoRA and one ablation per feature.
DEFAULT_VARIANTS = tuple(name for name in BUILTIN if name != "orthogonal")


class RecipeError(ValueError):
    """A recipe names an unknown setting or gives a value of the wrong type."""


def parse_value(key: str, text: str, types: dict[str, tuple[type, bool]]) -> Any:
    """`text` as the type of TrainConfig field `key` (`types`: flags.field_types); `captions` is one of CAPTIONS."""
    if key == "captions":
        if text not in CAPTIONS:
            raise RecipeError(f"captions={text}: expected one of {', '.join(CAPTIONS)}")
        return text
    if key not in types:
        hint = difflib.get_close_matches(key, types, n=1)
        raise RecipeError(f"{key}={text}: TrainConfig has no setting {key!r}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else " (is the trainer older than the recipe?)"))
    base, optional = types[key]
    if optional and text.lower() == "none":
        return None
    try:
        if base is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        if base is tuple:
            return tuple(v.strip() for v in text.split(","))
        return base(text)
    except (KeyError, ValueError):
        raise RecipeError(f"{key}={text}: expected {base.__name__}") from None


def parse_overrides(pairs: list[str], types: dict[str, tuple[type, bool]]) -> tuple[dict, str | None]:
    """["snr_gamma=5", "captions=scene"] -> ({"snr_gamma": 5.0}, "scene")."""
    overrides, captions = {}, None
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise RecipeError(f"{pair!r}: expected key=value, e.g. snr_gamma=5")
        value = parse_value(key, text.strip(), types)
        if key == "captions":
            captions = value
        else:
            overrides[key] = value
    return overrides, captions


def build_recipes(definitions: list[list[str]] | None, set_pairs: list[str] | None,
                  types: dict[str, tuple[type, bool]]) -> dict[str, Recipe]:
    """The built-in recipes, plus (or replacing) those of `--recipe NAME key=value ...`, each with `--set` on top."""
    recipes = dict(BUILTIN)
    for name, *pairs in definitions or []:
        check_name(name)
        overrides, captions = parse_overrides(pairs, types)
        start = recipes.get(name, BUILTIN[BASELINE])
        recipes[name] = Recipe(name, {**start.overrides, **overrides}, captions or start.captions,
                               f"{start.about or start.name} + {' '.join(pairs)}" if pairs else start.about)
    on_top, captions = parse_overrides(set_pairs or [], types)
    if on_top or captions:
        recipes = {name: Recipe(name, {**r.overrides, **on_top}, captions or r.captions, r.about)
                   for name, r in recipes.items()}
    return recipes


def check_name(name: str) -> None:
    """RecipeError unless `name` is a plain folder name: it names the runs' folders (<work-dir>/<name>-seed<N>), so
    `../x` would write outside --work-dir."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise RecipeError(f"--recipe {name!r}: a recipe name names its run folders; use letters, digits, '_', '-' and "
                          "'.', e.g. snr3")


def check_fields(recipe: Recipe, known: set[str]) -> None:
    """RecipeError when `recipe` overrides a setting TrainConfig does not have (a built-in recipe whose feature this
    trainer lacks): said before any run starts."""
    missing = sorted(set(recipe.overrides) - known)
    if missing:
        raise RecipeError(f"recipe {recipe.name}: TrainConfig has no setting {', '.join(missing)} (this trainer "
                          "lacks the feature); leave the recipe out of --variants")


def custom_names(definitions: list[list[str]] | None) -> list[str]:
    return [d[0] for d in definitions or [] if d[0] not in BUILTIN]

