"""Caption variation for captioned photo sets: dropout and shuffled tags (kohya sd-scripts' flags and meaning).

- `--caption_dropout_rate p`: an instance caption becomes "" with probability p, so the subject is also learned
  unconditioned (what classifier-free guidance contrasts against);
- `--shuffle_caption`: the comma-separated parts of a caption are shuffled, so no tag owes its weight to its
  place; `--keep_tokens N` keeps the first N parts (e.g. the trigger word) first, in order.
Each draw comes from a local rng keyed by (seed, epoch, item index), as the crop and flip are, so a resumed or
multi-process run sees the same captions; the key differs from the crop's, so the crops are unchanged by these
options and a latent cache can ask for a caption without loading the photo. Class captions are never varied.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionOptions:
    dropout_rate: float = 0.0  # 0..1: probability that an instance caption becomes ""
    shuffle: bool = False  # shuffle the comma-separated parts after the first keep_tokens
    keep_tokens: int = 0  # leading parts that stay in place

    @property
    def varies(self) -> bool:
        """Whether a caption can differ from the file's (the prompt is then not one of a fixed few)."""
        return self.dropout_rate > 0 or self.shuffle


def shuffle_parts(caption: str, keep: int, rng: random.Random) -> str:
    """The comma-separated parts after the first `keep` in random order, joined by ", " (kohya's form). Empty
    parts (a trailing or doubled comma) are dropped: shuffled in, they would leave ", ," inside the caption."""
    parts = [part.strip() for part in caption.split(",") if part.strip()]
    head, tail = parts[:keep], parts[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def vary_caption(caption: str, options: CaptionOptions, seed: int, epoch: int, index: int) -> str:
    """The caption item `index` gets in `epoch`: dropped ("") with probability options.dropout_rate, else shuffled
    when options.shuffle. The draws (dropout first, then the shuffle) depend only on (seed, epoch, index)."""
    if not options.varies:
        return caption
    rng = random.Random(f"{seed}:{epoch}:caption:{index}")  # str seeds are hashed with SHA-512: stable everywhere
    if rng.random() < options.dropout_rate:
        return ""
    return shuffle_parts(caption, options.keep_tokens, rng) if options.shuffle else caption
