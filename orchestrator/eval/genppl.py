"""`difflm eval RUN --gen-ppl`: sample a run unconditionally, score the samples with a judge, report the frontier.

One point = N samples from the family's sampler at T steps (categorical draws in ``sample_dtype``),
each cut at its first EOS (:func:`difflm.metrics.genppl.cut_at_eos`), scored by the judge; gen-PPL,
mean unigram entropy and the distinct-n / repetition diagnostics, with standard errors over samples.
Several T give the frontier (steps vs gen-PPL vs entropy vs seconds) and a PNG.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflm.metrics.genppl import GenPPL, cut_at_eos, gen_ppl, mean_se
from difflm.sampling import SampleOptions, get_sampler, sample_diagnostics
from difflm.sampling.diagnostics import repeated_ngram_rate
from orchestrator.devices import synchronize
from orchestrator.eval.judge import DifflmJudge, Judge


@dataclass
class GenPoint:
    """One frontier point: the metrics at ``steps`` sampler steps."""

    steps: int
    metrics: GenPPL
    seconds: float
    diagnostics: dict[str, float]
    repetition_se: float
    texts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": self.seconds, **self.metrics.scalars(),
                **{f"diag_{k}": v for k, v in self.diagnostics.items()}, "repeated_trigram_se": self.repetition_se}


def draw_samples(ckpt: Any, num: int, steps: int, sampler: str | None, sample_dtype: str, seed: int,
                 batch: int) -> tuple[list[list[int]], float, list[str]]:
    """``num`` unconditional samples of the trained length (ids cut at the first EOS), seconds, notes."""
    model, tok, spec = ckpt.model, ckpt.tokenizer, ckpt.spec
    fn = get_sampler(model, sampler or model.default_sampler)
    gen = torch.Generator(device=ckpt.device).manual_seed(seed)
    out: list[list[int]] = []
    notes: list[str] = []
    synchronize(ckpt.device)
    start = time.perf_counter()
    done = 0
    while done < num:
        n = min(batch, num - done)
        options = SampleOptions(num=n, length=spec.data.seq_len, steps=steps, window=spec.data.seq_len,
                                sample_dtype=sample_dtype)  # type: ignore[arg-type]
        options.validate()
        with torch.no_grad():
            result = fn(options, gen)
        notes += [m for m in result.notes if m not in notes]
        out += [cut_at_eos(r.tolist(), tok.eos_id, tok.bos_id) for r in result.tokens.cpu()]
        done += n
    synchronize(ckpt.device)
    return out, time.perf_counter() - start, notes


def score_samples(ckpt: Any, judge: Judge, ids: list[list[int]]) -> tuple[list[float], list[int], list[str]]:
    """The judge's NLL sums and token counts per sample, and the decoded texts."""
    texts = [ckpt.tokenizer.decode(s) for s in ids]
    same = isinstance(judge, DifflmJudge) and judge.same_tokenizer(ckpt.path / "tokenizer")
    sums, counts = judge.score(texts, ids if same else None)
    return sums, counts, texts


def gen_point(ckpt: Any, judge: Judge, num: int, steps: int, sampler: str | None, sample_dtype: str, seed: int,
              batch: int) -> GenPoint:
    ids, seconds, notes = draw_samples(ckpt, num, steps, sampler, sample_dtype, seed, batch)
    sums, counts, texts = score_samples(ckpt, judge, ids)
    if sum(counts) == 0:
        notes.append("the judge scored no token: every sample ends at once (EOS first)")
    metrics = gen_ppl(sums, counts, ids)
    diag = sample_diagnostics(texts)
    per_sample_rep = [repeated_ngram_rate([t.split()], 3) for t in texts]
    _, rep_se = mean_se([v for v in per_sample_rep if math.isfinite(v)])
    return GenPoint(steps=steps, metrics=metrics, seconds=seconds, diagnostics=diag.scalars(),
                    repetition_se=rep_se, texts=texts, notes=notes)


def frontier_table(points: list[GenPoint]) -> list[str]:
    """Lines: steps, gen-PPL ± SE, entropy ± SE, seconds."""
    lines = [f"{'steps':>6}  {'gen-PPL':>18}  {'entropy (nats)':>16}  {'seconds':>8}"]
    for p in points:
        m = p.metrics
        lines.append(f"{p.steps:>6}  {m.ppl:>9.2f} ± {m.ppl_se:<6.2f}  {m.entropy:>7.3f} ± {m.entropy_se:<6.3f}  "
                     f"{p.seconds:>8.1f}")
    return lines


def plot_frontier(points: list[GenPoint], path: Path, title: str) -> Path:
    """Entropy (x) vs gen-PPL (y, log) with one labelled point per step count and SE bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [p.metrics.entropy for p in points]
    ys = [p.metrics.ppl for p in points]
    ax.errorbar(xs, ys, xerr=[p.metrics.entropy_se for p in points], yerr=[p.metrics.ppl_se for p in points],
                fmt="o-", capsize=3)
    for p, x, y in zip(points, xs, ys):
        ax.annotate(f"T={p.steps}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mean unigram entropy (nats)")
    ax.set_ylabel("gen-PPL")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eval_dir(checkpoint: Path) -> Path:
    """Where eval results of a checkpoint go: RUN_DIR/eval for a run's checkpoint, else CHECKPOINT/eval.

    A run keeps ``RUN_DIR/checkpoint_N`` (``last`` links there) and its best as a copy
    ``RUN_DIR/checkpoints/best-checkpoint_N``, which is what a run dir resolves to; both map to
    ``RUN_DIR/eval``, where `difflm results` and `difflm export` look."""
    parent = checkpoint.parent
    if parent.name == "checkpoints":
        return parent.parent / "eval"
    return (parent if (parent / "checkpoints").is_dir() else checkpoint) / "eval"


def save_results(folder: Path, name: str, payload: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
