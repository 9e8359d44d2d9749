"""Judges: causal LMs that score samples (gen-PPL) and embed texts (MAUVE).

A judge is either a difflm ``ar`` run (any checkpoint reference ``difflm sample`` takes; the natural
judge on a machine without a model hub) or a local Hugging Face causal LM folder (``config.json`` +
weights + tokenizer, loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``, never from a hub).
Both are a :class:`CausalJudge`: they differ only in how they tokenise a text and run one window
(:meth:`CausalJudge.forward` -> logits and final hidden states). Scoring and features are written
once, in :class:`CausalJudge`, so an ar run and the same network seen as a Hugging Face model give the
same gen-PPL and MAUVE features (tests/test_gen_eval.py checks it); two copies of the window loop
drifted apart before (float32 vs float64 log-softmax, different offsets).
A judge with another tokenizer than the sampled model re-tokenises the decoded text; sequences
longer than its context are scored in windows (:func:`difflm.metrics.genppl.judge_windows`),
never truncated. Anything else (a missing folder, a diffusion run, a model that is not a causal LM)
raises :class:`~orchestrator.errors.SpecError` (exit 2) saying why.
"""

from __future__ import annotations

import filecmp
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from difflm.metrics.genppl import judge_windows
from orchestrator.errors import SpecError


class Judge(Protocol):
    """What gen-PPL and MAUVE need from a scorer LM."""

    name: str
    context: int

    def score(self, texts: list[str], ids: list[list[int]] | None = None) -> tuple[list[float], list[int]]:
        """Per text: (sum of NLL in nats over its scored tokens, number of scored tokens).

        ``ids``: the same texts as ids of the judge's own tokenizer (no BOS), used instead of
        re-tokenising when the caller knows the tokenizers are the same."""
        ...

    def features(self, texts: list[str]) -> torch.Tensor:
        """(N, D) float32: the last position's final hidden state per text, first window (MAUVE features)."""
        ...


class CausalJudge:
    """The one scoring path of every judge. Subclasses set ``name``, ``context``, ``device``, ``bos_id``
    and implement :meth:`encode` (text -> the judge's ids, no BOS) and :meth:`forward` (one window)."""

    name: str
    context: int
    device: torch.device
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def forward(self, window: Tensor) -> tuple[Tensor, Tensor]:
        """``window`` (1, W) int64 -> (logits (W, V), final hidden states (W, D)); position i predicts i + 1."""
        raise NotImplementedError

    def sequence(self, text: str, ids: list[int] | None = None) -> list[int]:
        """``[BOS] + ids`` (the judge's ids of ``text`` unless given); without a BOS the first token is context only."""
        body = list(ids) if ids is not None else self.encode(text)
        return ([self.bos_id] if self.bos_id is not None else []) + body

    @torch.no_grad()
    def score(self, texts: list[str], ids: list[list[int]] | None = None) -> tuple[list[float], list[int]]:
        """Per text (sum of NLL in nats, scored tokens): windows of ``context`` tokens, each token once,
        log-softmax in float64 (the per-token terms are summed over thousands of tokens)."""
        sums: list[float] = []
        counts: list[int] = []
        for i, text in enumerate(texts):
            seq = self.sequence(text, ids[i] if ids is not None else None)
            total, n = 0.0, 0
            for start, end, first in judge_windows(len(seq), self.context):
                window = torch.tensor([seq[start:end]], device=self.device)  # (1, W)
                logits, _ = self.forward(window)
                logp = logits[:-1].to(torch.float64).log_softmax(-1)  # (W-1, V): predicts positions 1..W-1
                nll = -logp.gather(-1, window[0, 1:, None])[:, 0]  # (W-1,)
                total += float(nll[first - start - 1:].sum())
                n += end - first
            sums.append(total)
            counts.append(n)
        return sums, counts

    @torch.no_grad()
    def features(self, texts: list[str]) -> torch.Tensor:
        """The final hidden state at each text's last token of its first window (as mauve-text embeds)."""
        feats = []
        for text in texts:
            seq = self.sequence(text)[: self.context] or [0]
            _, hidden = self.forward(torch.tensor([seq], device=self.device))
            feats.append(hidden[-1].float().cpu())
        return torch.stack(feats)  # (N, D)


class DifflmJudge(CausalJudge):
    """A difflm ``ar`` checkpoint as judge: logits and the final blocks' hidden states of its backbone."""

    def __init__(self, ckpt: Any) -> None:  # a LoadedCheckpoint (or anything with .model/.tokenizer/.spec/.path/.device)
        self.ckpt = ckpt
        self.name = f"difflm ar run {ckpt.path}"
        self.context = int(ckpt.spec.data.seq_len)
        self.device = ckpt.device
        self.bos_id = ckpt.tokenizer.bos_id
        self.tokenizer_dir = Path(ckpt.path) / "tokenizer"

    def encode(self, text: str) -> list[int]:
        return list(self.ckpt.tokenizer.encode(text))

    def forward(self, window: Tensor) -> tuple[Tensor, Tensor]:
        logits, hidden = self.ckpt.model.backbone(window, None, return_hidden=True)  # (1, W, V), (1, W, D)
        return logits[0], hidden[0]

    def same_tokenizer(self, other_dir: Path) -> bool:
        """True when ``other_dir`` holds the same tokenizer files (ids can be scored as they are)."""
        a, b = self.tokenizer_dir, Path(other_dir)
        if not a.is_dir() or not b.is_dir():
            return False
        names = sorted(p.name for p in a.iterdir() if p.is_file())
        if names != sorted(p.name for p in b.iterdir() if p.is_file()):
            return False
        return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


@dataclass
class HFJudge(CausalJudge):
    """A Hugging Face-style causal LM as judge (``model(input_ids=..., output_hidden_states=True)`` returning
    ``.logits`` and ``.hidden_states``; a tokenizer called as ``tokenizer(text, add_special_tokens=False)``).
    :func:`load_hf_judge` builds one from a local folder."""

    model: Any
    tokenizer: Any
    context: int
    device: torch.device = torch.device("cpu")
    name: str = "Hugging Face causal LM"
    bos_id: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.bos_id = self.tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def forward(self, window: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=window, output_hidden_states=True)
        return out.logits[0], out.hidden_states[-1][0]


def load_hf_judge(folder: Path, device: torch.device) -> HFJudge:
    """A local Hugging Face causal LM folder as judge; SpecError naming the folder and the reason otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable config is the same user error
        raise SpecError(f"--judge {folder}: not a Hugging Face model folder ({str(exc).splitlines()[0]})") from None
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise SpecError(f"--judge {folder}: {', '.join(archs)} is not a causal LM (its config.json names no "
                        "*ForCausalLM / *LMHeadModel architecture); give a causal LM folder or a difflm ar run")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except ValueError as exc:
        raise SpecError(f"--judge {folder}: {config.model_type!r} is not a causal LM "
                        f"(AutoModelForCausalLM: {str(exc).splitlines()[0]}); give a causal LM folder or a difflm ar run") from None
    except OSError as exc:
        raise SpecError(f"--judge {folder}: cannot load its weights ({str(exc).splitlines()[0]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"--judge {folder}: no usable tokenizer in the folder ({str(exc).splitlines()[0]})") from None
    ctx = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                if isinstance(getattr(config, k, None), int)), None)
    context = int(ctx if ctx is not None else tokenizer.model_max_length)
    return HFJudge(model=model.to(device).eval(), tokenizer=tokenizer, context=context, device=device,
                   name=f"Hugging Face {config.model_type} {folder} (context {context})")


def load_judge(ref: str, device: torch.device) -> DifflmJudge | HFJudge:
    """A judge from ``ref``: a folder with ``config.json`` and no ``spec.yaml`` is a Hugging Face model,
    anything else a difflm checkpoint reference that must be an ``ar`` run."""
    p = Path(ref).expanduser()
    if not p.exists():
        raise SpecError(f"--judge {ref!r} does not exist; give a difflm ar run or a local Hugging Face causal LM folder")
    if p.is_dir() and (p / "config.json").is_file() and not (p / "spec.yaml").is_file():
        return load_hf_judge(p, device)
    from orchestrator.rundir.checkpoints import load_checkpoint

    ckpt = load_checkpoint(p, device)
    if not ckpt.model.exact_likelihood:
        raise SpecError(f"--judge {ref}: family {ckpt.spec.model.family!r} is not a causal LM; a judge must be a "
                        "difflm ar run or a Hugging Face causal LM folder (its likelihood must be exact, not a bound)")
    return DifflmJudge(ckpt=ckpt)
