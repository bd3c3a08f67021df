"""Rare words in pretraining captions, so the toy text encoder represents every token, as CLIP does.

DreamBooth names a subject with a rare token ("sks") and relies on the text encoder giving it a
representation of its own: CLIP saw nearly every token somewhere in web text, so "sks" comes out
distinct from "a" while barely changing what the UNet draws (a weak prior). A toy text encoder trained
only on the world's ~50 words learns to ignore every other token: before this stage, "a photo of sks star"
and "a photo of a star" gave text features 0.16 apart (norm ~7), so no adapter could tell them apart
without also training the text encoder, and the subject leaked into the class prompt.

In a share of captions the article before the noun phrase ("a photo of a red star") becomes a random token
that no world caption uses ("a photo of <rare> red star"), `sks` among them; the image is unchanged. The
text encoder learns to keep token identity, the UNet that such words do not change the scene.
"""

from __future__ import annotations

import numpy as np
import torch

ARTICLE_POSITION = 4  # ids: <bos> a photo of [a|an] ... : every world caption starts this way


def rare_token_ids(tokenizer, world_words: tuple[str, ...]) -> torch.Tensor:
    """Every token id that no world caption uses, special tokens excluded."""
    used = {i for word in world_words for i in tokenizer(word, add_special_tokens=False).input_ids}
    special = set(tokenizer.all_special_ids)
    return torch.tensor(sorted(set(range(len(tokenizer))) - used - special))


def article_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("a", "an")])


def with_rare_words(ids: torch.Tensor, pool: torch.Tensor, articles: torch.Tensor, rate: float,
                    rng: np.random.Generator, joiner: torch.Tensor | None = None) -> torch.Tensor:
    """ids (B, 77): a copy in which each row's article before the noun becomes a random rare token with
    probability `rate` (rows without that article, e.g. empty captions, are left alone).

    `joiner`: the ids of "and" (pairs.py); the article right after it, a two-object caption's second noun
    phrase, is replaced the same way (independently), so "sks star ... and v square ..." is in distribution.
    Rows without the joiner draw nothing more from `rng`, so one-object batches are as before."""
    out = ids.clone()
    has_article = torch.isin(out[:, ARTICLE_POSITION], articles)
    chosen = torch.from_numpy(rng.random(len(out)) < rate) & has_article
    picks = torch.from_numpy(rng.integers(0, len(pool), int(chosen.sum())))
    out[chosen, ARTICLE_POSITION] = pool[picks]
    if joiner is not None:
        rows, cols = second_articles(ids, joiner, articles)
        if len(rows):
            keep = torch.from_numpy(rng.random(len(rows)) < rate)
            rows, cols = rows[keep], cols[keep]
            out[rows, cols] = pool[torch.from_numpy(rng.integers(0, len(pool), len(rows)))]
    return out


def joiner_ids(tokenizer) -> torch.Tensor:
    """The token ids of "and" (several tokens in the toy tokenizer)."""
    return torch.tensor(tokenizer("and", add_special_tokens=False).input_ids)


def second_articles(ids: torch.Tensor, joiner: torch.Tensor,
                    articles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of every article that directly follows the `joiner` sequence in ids (B, L)."""
    n = len(joiner)
    windows = ids.unfold(1, n + 1, 1)  # (B, L - n, n + 1)
    hit = (windows[..., :n] == joiner).all(-1) & torch.isin(windows[..., n], articles)
    rows, starts = hit.nonzero(as_tuple=True)
    return rows, starts + n
