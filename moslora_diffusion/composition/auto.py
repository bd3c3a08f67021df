"""Regions found automatically: each expert's mask from the cross-attention of its trigger word in the first steps.

FreeFuse-like (arXiv 2510.23515: masks from the early steps' cross-attention of each LoRA's concept tokens, each
LoRA then confined to its mask; training-free, no segmenter, no extra weights). Here:

1. a probe runs the first `auto_steps` denoising steps with every expert over the whole image (shares 1/N, the
   spatial router's branches), and in each cross-attention of expert i's branch records how much each position
   attends to expert i's trigger-word tokens (softmax over tokens, mean over heads, summed over the word's tokens,
   the guided half of the batch), resized to latent size and summed over layers and steps;
2. each expert's map is divided by its maximum per image; a latent position goes to the expert with the highest
   normalised map if that value is at least `threshold`, else to no expert (the base model). The masks are 0/1
   and never overlap;
3. the image is generated from the start (same seed) with these masks, as the regional method does.

Trigger words: given per expert, or else the words of the expert's training prompt (its `instance_prompt`) that the
prompt contains, leaving out common words, words that two experts' training prompts share and, when the expert
records the class prompt of its prior preservation, that prompt's words: "a photo of sks dog" with class prompt
"a photo of a dog" gives "sks" (a class noun alone, "a photo of a dog", does not call the subject).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..generation.text_to_image import GenerationRequest, run_pipeline
from ..mole import Expert
from .contexts import encode_branches
from .regions import CompositionError
from .router import SpatialRouter

COMMON_WORDS = frozenset("a an the of photo picture image on in at with and or to by for background left right "
                         "top bottom".split())
DEFAULT_THRESHOLD = 0.4


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", (text or "").lower())


def _identifier_words(prompt: str | None, class_prompt: str | None) -> list[str]:
    """The training prompt's uncommon words without the class prompt's (unless that leaves none)."""
    words = [w for w in dict.fromkeys(_words(prompt)) if w not in COMMON_WORDS]
    classes = set(_words(class_prompt))
    return [w for w in words if w not in classes] or words


def auto_triggers(trigger_prompts: Mapping[str, str | None], prompt: str,
                  given: Mapping[str, str | Sequence[str]] | None = None,
                  class_prompts: Mapping[str, str | None] | None = None) -> dict[str, list[str]]:
    """{expert: its trigger words}, each found in `prompt`. trigger_prompts: {expert: its training prompt or
    None}; given: {expert: word or words} overriding it; class_prompts: {expert: its class prompt or None}, whose
    words are no trigger words. CompositionError (one line) for an unknown expert or an expert none of whose
    trigger words the prompt contains. No model needed."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(trigger_prompts))
    if unknown:
        raise CompositionError(f"a trigger word for expert {unknown[0]!r}, which is not there; the experts are "
                               f"{', '.join(trigger_prompts)}")
    in_prompt = set(_words(prompt))
    derived = {n: _identifier_words(p, (class_prompts or {}).get(n)) for n, p in trigger_prompts.items()
               if n not in given}
    shared = {w for w, c in Counter(w for ws in derived.values() for w in ws).items() if c > 1}
    out = {}
    for name, text in trigger_prompts.items():
        if name in given:
            words = [given[name]] if isinstance(given[name], str) else list(given[name])
            words = [w for word in words for w in _words(word)]
            missing = [w for w in words if w not in in_prompt] or ([] if words else ["(none)"])
            if missing:
                raise CompositionError(f"automatic regions: the prompt does not contain {name!r}'s trigger word "
                                       f"{missing[0]!r}; put it in the prompt or give another --trigger {name}=WORD")
        else:
            words = [w for w in derived[name] if w not in shared and w in in_prompt]
            if not text:
                raise CompositionError(f"automatic regions: expert {name!r} records no training prompt to take its "
                                       f"trigger word from; give --trigger {name}=WORD (a word of the prompt)")
            if not words and derived[name] and all(w in shared for w in derived[name]):
                raise CompositionError(f"automatic regions: every word of expert {name!r}'s training prompt "
                                       f"({text!r}) is another expert's too, so none tells them apart; give "
                                       f"--trigger {name}=WORD")
            if not words:
                raise CompositionError(f"automatic regions: the prompt contains no trigger word of expert {name!r} "
                                       f"(trained on {text!r}); put its trigger word in the prompt or give "
                                       f"--trigger {name}=WORD")
        out[name] = words
    return out


def expert_triggers(experts: Sequence[Expert], prompt: str,
                    given: Mapping[str, str | Sequence[str]] | None = None) -> dict[str, list[str]]:
    """auto_triggers for loaded experts: their recorded training and class prompts."""
    return auto_triggers({e.name: e.trigger_prompt for e in experts}, prompt, given,
                         {e.name: e.class_prompt for e in experts})


def check_auto_options(steps: int, auto_steps=None, threshold=DEFAULT_THRESHOLD, **_) -> None:
    """auto_steps: 1..steps (None: steps // 5, at least 1); threshold in (0, 1]. CompositionError."""
    if auto_steps is not None and (not isinstance(auto_steps, int) or not 1 <= auto_steps <= steps):
        raise CompositionError(f"auto_steps must be a whole number of steps from 1 to {steps}, got {auto_steps!r}")
    if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise CompositionError(f"threshold must lie in (0, 1] (a share of each map's peak), got {threshold!r}")


def token_positions(tokenizer, prompt: str, words: Sequence[str]) -> list[int]:
    """Positions in the tokenised prompt (start token at 0) of every occurrence of the words' tokens."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    found = []
    for word in words:
        piece = tokenizer(word, add_special_tokens=False).input_ids
        found += [s + j for s in range(len(ids) - len(piece) + 1) if ids[s:s + len(piece)] == piece
                  for j in range(len(piece))]
    if not found:
        raise CompositionError(f"automatic regions: the words {list(words)} are not among the prompt's first "
                               f"{tokenizer.model_max_length} tokens")
    return sorted(set(found))


class AttentionProbe:
    """Sums, per image and expert, the attention each latent position pays to that expert's trigger tokens."""

    def __init__(self, router: SpatialRouter, tokens: Sequence[Sequence[int]], images: int):
        self.router, self.tokens, self.images = router, [list(t) for t in tokens], images
        self.maps = torch.zeros(images, len(tokens), *router.shares.shape[-2:])

    @torch.no_grad()
    def __call__(self, attn, hidden, context, branch: int) -> None:
        if branch == 0:
            return
        hidden, context = hidden[-self.images:], context[-self.images:]  # the guided (prompt) half
        q, k = attn.to_q(hidden), attn.to_k(context)  # the branch's expert included (the router's hooks)
        b, length, heads = q.shape[0], q.shape[1], attn.heads
        q = q.view(b, length, heads, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
        probs = (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(dim=-1).mean(dim=1)  # (B, L, T)
        h, w = self.router.grid(length)
        spots = probs[..., self.tokens[branch - 1]].sum(dim=-1).view(b, 1, h, w)
        self.maps[:, branch - 1] += F.interpolate(spots, size=self.maps.shape[-2:], mode="bilinear",
                                                  align_corners=False)[:, 0].cpu()

    def masks(self, threshold: float) -> torch.Tensor:
        """(B, N, H, W) 0/1 non-overlapping masks at latent size."""
        peak = self.maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        normalised = self.maps / peak
        best = normalised.argmax(dim=1, keepdim=True)
        winner = torch.zeros_like(normalised).scatter_(1, best, 1.0)
        return winner * (normalised >= threshold)


class _ProbeDone(Exception):
    pass


def auto_shares(pipe, router: SpatialRouter, experts: Sequence[Expert], req: GenerationRequest,
                triggers: Mapping[str, str | Sequence[str]] | None = None, auto_steps: int | None = None,
                threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """(B, N, h, w) masks found by the probe (see the module docstring)."""
    words = expert_triggers(experts, req.prompt, triggers)
    tokens = [token_positions(pipe.tokenizer, req.prompt, words[e.name]) for e in experts]
    steps = auto_steps or max(1, req.steps // 5)
    factor = int(pipe.vae_scale_factor)
    router.set_shares(torch.full((1, len(experts), req.height // factor, req.width // factor), 1.0 / len(experts),
                                 device=pipe._execution_device))
    probe = AttentionProbe(router, tokens, req.num_images)
    embeddings = encode_branches(pipe, router, req, [None] * len(experts))
    done = [0]

    def step():
        done[0] += 1
        if done[0] >= steps:
            raise _ProbeDone

    router.observers.append(probe)
    try:
        run_pipeline(pipe, req, step, embeddings)
    except _ProbeDone:
        pass
    finally:
        router.observers.remove(probe)
    return probe.masks(threshold)
