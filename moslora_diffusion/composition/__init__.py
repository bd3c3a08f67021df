"""Composition in one image: several experts (trained LoRAs) in one picture, whole-image or spatially routed.

    from moslora_diffusion.composition import compose, Region, METHODS
    result = compose(pipe, experts, "regional", request,
                     regions=[Region("star", box=(0, 0, 0.5, 1)), Region("square", box=(0.5, 0, 1, 1))])
    result.images, result.masks     # masks: per image {expert: (H, W) float in [0, 1]} (None: whole image)

See api.py for the methods and docs/composition-in-one-image.md for which to use when.
May import: mole, training, evaluation, toy, generation, formats, moslora, models, data, files, checks, console.
"""

from .api import LAYOUT_METHODS, METHODS, CompositionResult, check_layout, compose
from .regions import CompositionError, Region, check_regions

__all__ = ["LAYOUT_METHODS", "METHODS", "CompositionError", "CompositionResult", "Region", "check_layout",
           "check_regions", "compose"]
