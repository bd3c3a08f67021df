"""The web app: generation with live adapter scales at base-model speed, export, and training jobs.

Only `cli` and the UI modules (`ui`, `compose_ui`, `ui_common`) import Gradio; the rest is plain Python, tested
without a browser.
"""

from ..generation.fusion import FusedAdapters
from ..generation.text_to_image import GeneratedImage, GenerationError, GenerationRequest, generate
from .paths import AllowedRoots, PathNotAllowedError

__all__ = ["AllowedRoots", "FusedAdapters", "GeneratedImage", "GenerationError", "GenerationRequest",
           "PathNotAllowedError", "generate"]
