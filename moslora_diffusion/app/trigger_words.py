"""The trigger word of an instance prompt, when it is obvious: the default of the Train tab's pivotal tuning.

DreamBooth writes the instance prompt as the class prompt plus a rare identifier ("a photo of sks dog" for the
class "a photo of a dog"), so the one word the instance prompt adds is the trigger word. Without a class prompt
(or when it adds several words), a word that DreamBooth guides use as the identifier (diffusers' "sks", the kohya
community's "ohwx") is obvious when it is the only one. Anything else is left to the user: a wrong guess would
train the embedding of an ordinary word.
"""

from __future__ import annotations

import re

COMMON_IDENTIFIERS = ("sks", "ohwx", "zwx")


def _words(prompt: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"\w+", prompt or "")))


def guess_trigger_word(instance_prompt: str, class_prompt: str = "") -> str:
    """The obvious trigger word of `instance_prompt` as written there, or "" when there is none."""
    words = _words(instance_prompt)
    if (class_prompt or "").strip():
        known = {w.lower() for w in _words(class_prompt)}
        added = [w for w in words if w.lower() not in known]
        if len(added) == 1:
            return added[0]
    identifiers = [w for w in words if w.lower() in COMMON_IDENTIFIERS]
    return identifiers[0] if len(identifiers) == 1 else ""
