"""Prompts -> token templates: a prefix to continue, or text with ``[MASK:n]`` spans to infill.

    "The capital of India is"              prefix: BOS + prompt fixed, the rest generated
    "The capital of India is [MASK:5]."    infill: BOS + text fixed, exactly 5 tokens generated
    "[MASK:3] is a [MASK] language"        ``[MASK]`` alone is one token

A template is ``ids`` (L,) plus a bool ``fixed`` (L,): fixed positions are copied and never
change, free ones are generated (their ids are placeholders). Spans count *tokens* of the
run's tokenizer (bytes for the byte tokenizer). Each text segment is tokenized on its own,
so a BPE merge never crosses a span boundary.

Position 0 is BOS (fixed) for prompted templates, because every training block starts with
BOS; unconditional sampling has no template at all (BOS is generated like any token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from difflm.sampling.core import SamplingError

if TYPE_CHECKING:
    from difflm.data.tokenization import Tokenizer

__all__ = ["Template", "PromptPart", "parse_prompt", "build_template", "MAX_SPAN"]

#: anything that looks like a mask span, strict or not (so typos are reported instead of kept as text)
_SPAN_LIKE = re.compile(r"\[MASK[^\]\[]*\]")
_SPAN = re.compile(r"\[MASK(?::(\d+))?\]")
MAX_SPAN = 100_000


@dataclass(frozen=True)
class PromptPart:
    """A piece of a parsed prompt: literal ``text``, or a span of ``masks`` tokens to generate."""

    text: str = ""
    masks: int = 0


@dataclass(frozen=True)
class Template:
    """ids (L,) int64 and fixed (L,) bool; ``kind`` says how it was made (prefix or infill)."""

    ids: Tensor
    fixed: Tensor
    kind: Literal["prefix", "infill"]

    @property
    def length(self) -> int:
        return int(self.ids.numel())

    @property
    def num_free(self) -> int:
        return int((~self.fixed).sum())


def parse_prompt(prompt: str) -> list[PromptPart]:
    """Split ``prompt`` into text and ``[MASK:n]`` parts; SamplingError for a malformed span."""
    parts: list[PromptPart] = []
    pos = 0
    for m in _SPAN_LIKE.finditer(prompt):
        strict = _SPAN.fullmatch(m.group(0))
        if strict is None:
            raise SamplingError(
                f"malformed mask span {m.group(0)!r} at character {m.start()}: write [MASK] for one token "
                "or [MASK:n] for n tokens, e.g. [MASK:5]"
            )
        n = int(strict.group(1)) if strict.group(1) is not None else 1
        if not 1 <= n <= MAX_SPAN:
            raise SamplingError(f"mask span {m.group(0)!r}: the token count must be between 1 and {MAX_SPAN}")
        if m.start() > pos:
            parts.append(PromptPart(text=prompt[pos:m.start()]))
        parts.append(PromptPart(masks=n))
        pos = m.end()
    if pos < len(prompt):
        parts.append(PromptPart(text=prompt[pos:]))
    return parts


def build_template(
    tokenizer: Tokenizer, prompt: str, length: int | None = None, *, default_length: int | None = None,
    bos: bool = True,
) -> Template:
    """The template of ``prompt`` for samples of ``length`` tokens.

    Prefix prompt (no mask span): BOS + prompt tokens fixed, then free positions up to ``length``
    (``default_length`` when None; one of them is required). Infill prompt: BOS + text tokens fixed, ``n`` free positions per ``[MASK:n]``;
    its length is its own unless ``length`` asks for more, in which case free positions are
    appended (infill + continuation). SamplingError when the prompt does not fit in ``length``."""
    parts = parse_prompt(prompt)
    ids: list[int] = [tokenizer.bos_id] if bos else []
    fixed: list[bool] = [True] * len(ids)
    infill = any(p.masks for p in parts)
    for part in parts:
        if part.masks:
            ids += [0] * part.masks
            fixed += [False] * part.masks
        else:
            enc = tokenizer.encode(part.text)
            ids += enc
            fixed += [True] * len(enc)
    if not infill:
        length = length or default_length
        if length is None:
            raise SamplingError("a prefix prompt needs a sample length")
        if len(ids) >= length:
            raise SamplingError(
                f"the prompt is {len(ids)} tokens (with BOS), so nothing is left to generate in {length}; "
                "raise --length or shorten the prompt"
            )
    elif length is not None and length < len(ids):
        raise SamplingError(
            f"the infill template is {len(ids)} tokens (with BOS) but --length is {length}; "
            "leave --length out (the template sets it) or raise it"
        )
    target = len(ids) if (infill and length is None) else max(length or 0, len(ids))
    ids += [0] * (target - len(ids))
    fixed += [False] * (target - len(fixed))
    return Template(
        ids=torch.tensor(ids, dtype=torch.long),
        fixed=torch.tensor(fixed, dtype=torch.bool),
        kind="infill" if infill else "prefix",
    )
