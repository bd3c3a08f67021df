"""Reading Markdown for the docs test (tests/test_docs.py): fenced blocks with their line numbers, headings as
GitHub's anchors, and every relative link checked against the files and headings it names.

The anchor rule is GitHub's (github-slugger): the heading's rendered text lower-cased, every character that is
not a letter, digit, `_`, `-` or space dropped, each space turned into `-`; a repeated slug gets `-1`, `-2`, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_HTML_TARGET = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
_HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass(frozen=True)
class Block:
    """One fenced code block: `lang` and `options` from its info string (```python no-run), `line` the
    1-based line of its first content line in `path`; `label` names the file in messages (docs/app.md)."""
    path: Path
    label: str
    line: int
    lang: str
    options: tuple[str, ...]
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{self.label}:{self.line + offset}"


def fenced_blocks(path: Path, label: str, text: str | None = None) -> list[Block]:
    """Every fenced block of a Markdown file (also indented ones inside list items), content de-indented."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        words = match["info"].strip().split()
        closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body, j = [], i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            j += 1
        lang = words[0].lower() if words else ""
        blocks.append(Block(path, label, i + 2, lang, tuple(w.lower() for w in words[1:]), "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def prose_lines(text: str, keep_code: bool = False) -> list[tuple[int, str]]:
    """(1-based line number, text) of every line outside fenced blocks, with HTML comments blanked and, unless
    keep_code, inline code spans too (a link written inside them is not a link)."""
    text = re.sub(r"<!--.*?-->", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.DOTALL)
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = re.compile(rf"^ *{re.escape(match['fence'][0])}{{{len(match['fence'])},}}\s*$")
            continue
        if fence is not None:
            if fence.match(line):
                fence = None
            continue
        out.append((number, line if keep_code else re.sub(r"(`+)(?:(?!\1).)+?\1", lambda m: " " * len(m.group(0)),
                                                          line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's Markdown text (before the -1, -2 suffix of repeats)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags show nothing
    text = re.sub(r"(\*{1,3})(\S.*?\S|\S)\1", r"\2", text)  # emphasis markers are not text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path, text: str | None = None) -> set[str]:
    """Every anchor a page has: its headings' slugs (repeats numbered) and explicit <a id=...> / <a name=...>."""
    text = path.read_text(encoding="utf-8") if text is None else text
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(text, keep_code=True):
        heading = _HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(_HTML_ANCHOR.findall(line))
    return found


def links(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, target) of every link and image in the prose: inline, reference definitions, HTML href / src."""
    text = path.read_text(encoding="utf-8") if text is None else text
    found = []
    for number, line in prose_lines(text):
        targets = _LINK.findall(line) + _HTML_TARGET.findall(line)
        reference = _REFERENCE.match(line)
        if reference:
            targets.append(reference.group(1))
        found += [(number, target) for target in targets]
    return found


def link_problems(path: Path, label: str, repo: Path, text: str | None = None) -> list[str]:
    """One line per dead relative link or anchor: `<label>:<line>: ...`. Web links (any scheme) are not fetched.

    `text` stands in for the file's content (the test of the test feeds synthetic Markdown)."""
    problems = []
    own = None
    for number, target in links(path, text):
        if _SCHEME.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        if file_part:
            resolved = (path.parent / file_part.split("?")[0]).resolve()
            if not resolved.exists():
                problems.append(f"{label}:{number}: dead link {target!r}: {file_part} does not exist")
                continue
            if not resolved.is_relative_to(repo.resolve()):
                problems.append(f"{label}:{number}: link {target!r} leads outside the repository")
                continue
        else:
            resolved = path
        if not anchor or resolved.suffix.lower() != ".md" or resolved.is_dir():
            continue
        if resolved == path:
            own = own if own is not None else anchors(path, text)
            page_anchors = own
        else:
            page_anchors = anchors(resolved)
        if anchor not in page_anchors:
            near = sorted(a for a in page_anchors if a.startswith(anchor[:8]))[:3]
            problems.append(f"{label}:{number}: dead anchor {target!r}: no heading of {resolved.name} has the slug "
                            f"{anchor!r}" + (f" (near: {', '.join(near)})" if near else ""))
    return problems
