"""Prompt text as the web UIs read it: attention weights, BREAK, and `<lora:name:weight>` tags. Pure: no torch.

A1111/Forge's emphasis syntax: `(word)` is x1.1, `((word))` x1.21, `[word]` /1.1, `(word:1.3)` sets 1.3
(times any enclosing brackets), `\\(` and `\\)` are literal brackets, and `BREAK` (upper case, a word of its own)
starts a new 75-token chunk. Unbalanced brackets are read as A1111 reads them: an unclosed `(` or `[` weights
everything after it, a stray `)` or `]` is text. `<lora:name:weight>` and `<lyco:...>` tags are taken out of
the text and added to the row's blend, as the web UIs do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

CHUNK = 75  # CLIP tokens per chunk, without BOS and EOS (77 in all)
ROUND = 1.1  # `(word)`
SQUARE = 1 / 1.1  # `[word]`

# one token of the syntax: escapes, brackets, a `:weight)` close, plain text runs, a lone colon
TOKEN = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\   # escapes (a lone backslash is text)
    | \( | \[                              # openers
    | :\s*([+-]?[.\d]+)\s*\)               # `:1.3)`: closes a round bracket with that weight
    | \) | \]                              # closers
    | [^\\()\[\]:]+                        # text
    | :                                    # a colon that is not a weight
    """,
    re.VERBOSE,
)
BREAK = re.compile(r"\s*\bBREAK\b\s*")
LORA_TAG = re.compile(r"<(lora|lyco):([^:>]+)(?::([^:>]*))?(?::([^>]*))?>", re.IGNORECASE)


@dataclass(frozen=True)
class Segment:
    """A run of prompt text with one weight; `text` is None for a BREAK."""

    text: str | None
    weight: float = 1.0

    @property
    def is_break(self) -> bool:
        return self.text is None


def parse_weights(text: str) -> list[Segment]:
    """Prompt text -> runs of text with their weights and BREAKs, merged where neighbours share a weight."""
    runs: list[list] = []  # [text or None, weight]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            if run[0] is not None:
                run[1] *= factor

    for match in TOKEN.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            runs.append([piece[1], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK.split(piece)):
                if i:
                    runs.append([None, 1.0])
                if part:
                    runs.append([part, 1.0])
    for start in round_open:  # unclosed: weighted to the end, as A1111 does
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for run in runs:
        if merged and run[0] is not None and merged[-1][0] is not None and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [Segment(t, w) for t, w in merged] or [Segment("", 1.0)]


def has_weights(text: str) -> bool:
    """Whether a prompt uses the emphasis syntax or BREAK (plain prompts encode as they always did)."""
    return any(s.is_break or s.weight != 1.0 for s in parse_weights(text)) or "\\" in text


def plain_text(text: str) -> str:
    """The words the encoder reads, without the syntax: '(red:1.5) circle' -> 'red circle'."""
    return "".join(s.text for s in parse_weights(text) if not s.is_break)


@dataclass(frozen=True)
class LoraTag:
    name: str
    strength: float | None  # A1111's first weight: the text encoders' and, alone, the whole LoRA's; None: not a number
    raw: str  # the tag as written
    note: str = ""  # what of the tag is not applied
    unet: float | None = None  # A1111's second weight, the UNet's / transformer's (`<lora:name:te:unet>`)


def lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """(the text without its `<lora:...>`/`<lyco:...>` tags, the tags in order). `<lora:name>` is strength 1;
    `<lora:name:0.5:1>` is 0.5 for the text encoders and 1 for the UNet or transformer, as in A1111."""
    tags = []
    for match in LORA_TAG.finditer(text):
        _, name, first, second = match.groups()
        strength: float | None = 1.0
        if first not in (None, ""):
            strength = _number(first)
        unet, note = None, ""
        if second:
            unet = _number(second.split("=")[-1])
            if unet is None:
                note = f"the second weight of '{match.group(0)}' is not a number: the LoRA runs at one strength"
        tags.append(LoraTag(name.strip(), strength, match.group(0), note, unet))
    stripped = LORA_TAG.sub("", text)
    if tags:  # removed as the web UIs remove them; only the spaces left are collapsed (CLIP's tokenizer does the same)
        stripped = re.sub(r"\s+", " ", stripped).strip()
    return stripped, tags


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def token_count(tokenizer: Any, text: str) -> int:
    """CLIP tokens of a prompt's words (no BOS/EOS, without the syntax): over CHUNK, the prompt takes several chunks."""
    return sum(len(tokenizer(s.text, add_special_tokens=False).input_ids) for s in parse_weights(text) if not s.is_break)


def may_be_long(text: str) -> bool:
    """Whether a prompt can be over one chunk at all: each token covers at least one character that is not a space."""
    return sum(not c.isspace() for c in text) > CHUNK
