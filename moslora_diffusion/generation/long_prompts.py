"""A prompt longer than CLIP's window (77 tokens): one line of ours instead of two libraries' paragraphs.

diffusers logs the whole dropped text (thousands of characters for a long prompt) and transformers adds a
paragraph about indexing errors; both say only that CLIP reads the first 77 tokens. `long_prompt_note` says that
in one line, with the words where the prompt is cut, and `quiet_library_notes` drops the two library messages.
"""

from __future__ import annotations

import logging
import warnings

# The two messages replaced (diffusers' text-to-image pipelines, transformers' tokenizers).
_REPLACED = ("was truncated because CLIP can only handle", "Token indices sequence length is longer than")


class _DropReplaced(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _REPLACED)


_FILTER = _DropReplaced()


def quiet_library_notes() -> None:
    """Drops the two messages at diffusers' and transformers' own handlers (their loggers do not propagate);
    every other message of theirs is left as it is. Idempotent."""
    for name in ("diffusers", "transformers"):
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def warn_long_prompts(tokenizer, texts: dict[str, str | None]) -> None:
    """One `warnings.warn` per text (flag -> text) past the window, each text once per process: a command warns
    before its progress bar starts (a warning printed inside a bar's line is overwritten by its next redraw), and
    the pipeline's own call then stays silent."""
    if tokenizer is None:
        return
    quiet_library_notes()
    for flag, text in texts.items():
        if not text or (flag, text) in _WARNED:
            continue
        _WARNED.add((flag, text))
        note = long_prompt_note(tokenizer, text, flag.replace("_", " "))
        if note:
            warnings.warn(note, stacklevel=3)


_WARNED: set[tuple[str, str]] = set()


def long_prompt_note(tokenizer, prompt: str, flag: str = "prompt") -> str | None:
    """None when `prompt` fits the tokenizer's window (model_max_length tokens, start and end tokens included);
    else one line: its length in tokens and the last words kept."""
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return None
    kept = tokenizer.decode(ids[1:limit - 1]).split()
    return (f"the {flag} is {len(ids)} tokens; CLIP reads the first {limit}, up to \"... {' '.join(kept[-4:])}\": "
            "the rest is dropped")
