"""Notes a training command prints about flags it was given but will not use (a run never goes without what was
asked for without a word; diffusers' scripts warn the same way)."""

from __future__ import annotations

# Flags the user may give that act only with another setting: (flags, condition under which they act, why not).
_ACTS_ONLY_WITH = (
    (("class_prompt", "class_data_dir", "num_class_images", "prior_loss_weight"),
     lambda c: c.with_prior_preservation, "used only with --with_prior_preservation"),
    (("mixer_init",), lambda c: c.adapter == "moslora", "--adapter lora has no mixer"),
    (("num_validation_images",), lambda c: bool(c.validation_prompt), "used only with --validation_prompt"),
    (("validation_steps",), lambda c: bool(c.validation_prompt) or c.validation_loss_photos > 0,
     "used only with --validation_prompt or --validation_loss_photos"),
)


def unused_flag_notes(config, given: set[str]) -> list[str]:
    """One line per group of flags the user gave (`given`: command line or config file) that this run (`config`, a
    TrainConfig) will not use."""
    notes = []
    for flags, acts, why in _ACTS_ONLY_WITH:
        named = [f"--{f}" for f in flags if f in given]
        if named and not acts(config):
            verb = "has" if len(named) == 1 else "have"
            notes.append(f"Note: {', '.join(named)} {verb} no effect in this run ({why})")
    return notes
