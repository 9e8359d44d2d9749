"""Judges: causal LMs that score samples (gen-PPL) and embed texts (MAUVE).

A judge is either a difflm ``ar`` run (any checkpoint reference ``difflm sample`` takes; the natural
judge on a machine without a model hub) or a local Hugging Face causal LM folder (``config.json`` +
weights + tokenizer, loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``, never from a hub).
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
        """(N, D) float32: the last scored position's final hidden state per text (MAUVE features)."""
        ...


def _seq(bos: int | None, body: list[int]) -> list[int]:
    return ([bos] if bos is not None else []) + body


@dataclass
class DifflmJudge:
    """A difflm ``ar`` checkpoint as judge; scores with ``Family.val_nll`` (exact for ar)."""

    ckpt: Any  # LoadedCheckpoint
    name: str = ""
    context: int = 0
    tokenizer_dir: Path | None = None

    def __post_init__(self) -> None:
        self.name = f"difflm ar run {self.ckpt.path}"
        self.context = int(self.ckpt.spec.data.seq_len)
        self.tokenizer_dir = self.ckpt.path / "tokenizer"

    def same_tokenizer(self, other_dir: Path) -> bool:
        """True when ``other_dir`` holds the same tokenizer files (ids can be scored as they are)."""
        assert self.tokenizer_dir is not None
        a, b = self.tokenizer_dir, Path(other_dir)
        if not b.is_dir():
            return False
        names = sorted(p.name for p in a.iterdir() if p.is_file())
        if names != sorted(p.name for p in b.iterdir() if p.is_file()):
            return False
        return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)

    @torch.no_grad()
    def score(self, texts: list[str], ids: list[list[int]] | None = None) -> tuple[list[float], list[int]]:
        from difflm.evaluation import make_val_noise

        tok, model, dev = self.ckpt.tokenizer, self.ckpt.model, self.ckpt.device
        bodies = ids if ids is not None else [tok.encode(t) for t in texts]
        sums: list[float] = []
        counts: list[int] = []
        for body in bodies:
            seq = _seq(tok.bos_id, list(body))
            total, n = 0.0, 0
            for start, end, first in judge_windows(len(seq), self.context):
                window = torch.tensor([seq[start:end]], device=dev)  # (1, W)
                counted = torch.zeros_like(window, dtype=torch.bool)
                counted[0, first - start:] = True
                noise = make_val_noise([0], 1, window.shape[1], 0, dev)
                total += float(model.val_nll(window, counted, noise)[0, 0])
                n += end - first
            sums.append(total)
            counts.append(n)
        return sums, counts

    @torch.no_grad()
    def features(self, texts: list[str]) -> torch.Tensor:
        raise SpecError("MAUVE features need a Hugging Face judge (--judge HF_DIR); a difflm ar run has no "
                        "feature interface")


@dataclass
class HFJudge:
    """A local Hugging Face causal LM folder as judge (re-tokenised with its own tokenizer)."""

    folder: Path
    device: torch.device
    name: str = ""
    context: int = 0
    model: Any = None
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(str(self.folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable config is the same user error
            raise SpecError(f"--judge {self.folder}: not a Hugging Face model folder ({str(exc).splitlines()[0]})") from None
        archs = list(getattr(config, "architectures", None) or [])
        if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            raise SpecError(f"--judge {self.folder}: {', '.join(archs)} is not a causal LM (its config.json names no "
                            "*ForCausalLM / *LMHeadModel architecture); give a causal LM folder or a difflm ar run")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(self.folder), local_files_only=True)
        except ValueError as exc:
            raise SpecError(f"--judge {self.folder}: {config.model_type!r} is not a causal LM "
                            f"(AutoModelForCausalLM: {str(exc).splitlines()[0]}); give a causal LM folder or a difflm ar run") from None
        except OSError as exc:
            raise SpecError(f"--judge {self.folder}: cannot load its weights ({str(exc).splitlines()[0]})") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise SpecError(f"--judge {self.folder}: no usable tokenizer in the folder ({str(exc).splitlines()[0]})") from None
        self.model = self.model.to(self.device).eval()
        ctx = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                    if isinstance(getattr(config, k, None), int)), None)
        if ctx is None:
            ctx = int(self.tokenizer.model_max_length)
        self.context = int(ctx)
        self.name = f"Hugging Face {config.model_type} {self.folder} (context {self.context})"

    def _encode(self, text: str) -> list[int]:
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return _seq(bos, list(body))

    @torch.no_grad()
    def score(self, texts: list[str], ids: list[list[int]] | None = None) -> tuple[list[float], list[int]]:
        sums: list[float] = []
        counts: list[int] = []
        for i, text in enumerate(texts):
            seq = _seq(self.tokenizer.bos_token_id, list(ids[i])) if ids is not None else self._encode(text)
            total, n = 0.0, 0
            for start, end, first in judge_windows(len(seq), self.context):
                window = torch.tensor([seq[start:end]], device=self.device)  # (1, W)
                logits = self.model(input_ids=window).logits[0].to(torch.float64)  # (W, V)
                logp = logits[:-1].log_softmax(-1)  # predicts positions 1..W-1
                targets = window[0, 1:]
                nll = -logp.gather(-1, targets[:, None])[:, 0]  # (W-1,)
                total += float(nll[first - start - 1:].sum())
                n += end - first
            sums.append(total)
            counts.append(n)
        return sums, counts

    @torch.no_grad()
    def features(self, texts: list[str]) -> torch.Tensor:
        """The final hidden state at each text's last token (its first window of context tokens, as mauve-text)."""
        feats = []
        for text in texts:
            seq = self._encode(text)[: self.context] or [self.tokenizer.eos_token_id or 0]
            out = self.model(input_ids=torch.tensor([seq], device=self.device), output_hidden_states=True)
            feats.append(out.hidden_states[-1][0, -1].float().cpu())
        return torch.stack(feats)


def load_judge(ref: str, device: torch.device) -> DifflmJudge | HFJudge:
    """A judge from ``ref``: a folder with ``config.json`` and no ``spec.yaml`` is a Hugging Face model,
    anything else a difflm checkpoint reference that must be an ``ar`` run."""
    p = Path(ref).expanduser()
    if not p.exists():
        raise SpecError(f"--judge {ref!r} does not exist; give a difflm ar run or a local Hugging Face causal LM folder")
    if p.is_dir() and (p / "config.json").is_file() and not (p / "spec.yaml").is_file():
        return HFJudge(folder=p, device=device)
    from orchestrator.rundir.checkpoints import load_checkpoint

    ckpt = load_checkpoint(p, device)
    if not ckpt.model.exact_likelihood:
        raise SpecError(f"--judge {ref}: family {ckpt.spec.model.family!r} is not a causal LM; a judge must be a "
                        "difflm ar run or a Hugging Face causal LM folder (its likelihood must be exact, not a bound)")
    return DifflmJudge(ckpt=ckpt)
