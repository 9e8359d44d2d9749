"""Sample diagnostics (difflm.sampling.diagnostics): exact numbers on hand-made texts, and when warnings fire."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from difflm.data import prepare_data
from difflm.families import build_model
from difflm.sampling.diagnostics import (
    distinct_n,
    duplicate_fraction,
    longest_run,
    repeated_ngram_rate,
    sample_diagnostics,
)
from orchestrator.train.engine import TorchEngine
from orchestrator.train.runner import Runner, WorkerContext
from orchestrator.spec.run import RunSpec

DIVERSE = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "A function definition binds the function name in the current local namespace.",
    "Exceptions are raised when an error is detected and can be handled by try statements.",
    "Each module has its own private namespace used as the global namespace by functions.",
]


def test_distinct_n_numbers() -> None:
    assert distinct_n([["a", "a", "a", "a"]], 1) == 0.25
    assert distinct_n([["a", "a", "a", "a"]], 2) == pytest.approx(1 / 3)  # (a,a) x3
    assert distinct_n([["a", "b"], ["a", "c"]], 1) == 0.75  # pooled over samples: a, b, c of 4
    assert distinct_n([["a", "b", "c"]], 3) == 1.0
    assert math.isnan(distinct_n([["a", "b"]], 3))  # no trigram: undefined, not 0


def test_repetition_duplicates_and_runs() -> None:
    # "x y z x y z": trigrams xyz, yzx, zxy, xyz -> 1 of 4 repeats
    assert repeated_ngram_rate([["x", "y", "z", "x", "y", "z"]], 3) == 0.25
    assert repeated_ngram_rate([["a", "b", "c"], ["a", "b", "c"]], 3) == 0.0  # across samples is not repetition
    assert duplicate_fraction(["a b", "a  b", "c"]) == pytest.approx(1 / 3)  # whitespace-normalised
    assert duplicate_fraction([]) == 0.0
    assert longest_run(["a", "b", "b", "b", "c"]) == 3 and longest_run([]) == 0


def test_diverse_text_has_no_warning() -> None:
    d = sample_diagnostics(DIVERSE)
    assert d.warnings == []
    assert d.num_samples == 4 and d.duplicate_fraction == 0.0 and d.repeated_ngram_rate == 0.0
    assert d.distinct_2 > 0.95 and d.mean_length == pytest.approx((14 + 12 + 15 + 14) / 4)
    assert d.within_distinct_1 == pytest.approx((13 / 14 + 10 / 12 + 15 / 15 + 13 / 14) / 4)  # the, function, namespace
    assert set(d.scalars()) == {"distinct_1", "distinct_2", "distinct_3", "within_distinct_1", "repeated_ngram_rate",
                                "duplicate_fraction", "mean_length", "longest_run"}


def test_repetition_warns() -> None:
    texts = ["the model is leading leading leading leading leading the way", *DIVERSE[1:]]
    d = sample_diagnostics(texts)
    assert d.longest_run == 5
    assert any("repeats 'leading' 5 times in a row" in w for w in d.warnings), d.warnings
    loop = sample_diagnostics(["one two three one two three one two three one two three"])
    assert loop.repeated_ngram_rate == pytest.approx(7 / 10)  # 10 trigrams, 3 distinct
    assert any("70% of word trigrams recur" in w for w in loop.warnings), loop.warnings
    few_words = sample_diagnostics(["te the te th the te te th e te the th"])  # 12 words, 4 distinct
    assert few_words.within_distinct_1 == pytest.approx(4 / 12) and few_words.longest_run == 2
    assert any("on average 33% of its words are distinct" in w for w in few_words.warnings), few_words.warnings


def test_collapse_warns() -> None:
    generic = "it is a good thing to have a good thing"
    d = sample_diagnostics([generic, generic, generic, DIVERSE[0]])
    assert d.duplicate_fraction == 0.5
    assert any("collapse: 2 of 4 samples are exact copies" in w for w in d.warnings), d.warnings
    few = sample_diagnostics(["a b a b a b a b a b a b", "b a b a b a b a b a b a"])  # 22 bigrams, 2 distinct
    assert few.distinct_2 == pytest.approx(2 / 22)
    assert any("only 9% of word bigrams are distinct" in w for w in few.warnings), few.warnings


def test_empty_samples_warn_and_stats_stay_finite() -> None:
    d = sample_diagnostics(["", "   ", "hello there"])
    assert any("2 of 3 samples are empty" in w for w in d.warnings)
    assert math.isnan(d.distinct_3) and "distinct_3" not in d.scalars()  # NaN never reaches TensorBoard
    assert "n/a" in d.summary()


def test_runner_logs_sample_diagnostics_and_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's eval point logs samples/* scalars next to the text and emits the warnings."""
    spec = RunSpec.model_validate({
        "model": {"family": "mdlm", "size": None, "d_model": 16, "n_layers": 1, "n_heads": 2, "cond_dim": 8},
        "data": {"source": "builtin", "seq_len": 32, "max_documents": 100, "cache_dir": str(tmp_path / "cache")},
        "train": {"eval_every": 10, "checkpoint_every": 10},
        "scaling": {"deepspeed": False, "device": "cpu"},
    })
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size)
    scalars: dict[str, float] = {}
    texts: list[str] = []
    messages: list[str] = []

    class Logger:
        def log_scalars(self, metrics: dict[str, float], step: int) -> None:
            scalars.update(metrics)

        def log_text(self, tag: str, text: str, step: int) -> None:
            texts.append(tag)

        def flush(self) -> None: ...

        def close(self) -> None: ...

    cpu = torch.device("cpu")
    runner = Runner(spec, data, TorchEngine(model, spec.train, cpu), WorkerContext(0, 1, cpu), logger=Logger(),
                    emit=lambda kind, payload: messages.append(payload.get("message", "")))
    monkeypatch.setattr(runner, "validate", lambda: {"val/nll": 1.0, "val/bpt": 1.4, "val/ppl": 2.7, "val/tokens": 1.0})
    monkeypatch.setattr(runner, "sample_texts", lambda: ["leading leading leading leading leading"] * 4)
    runner.step = 5  # the step-0 eval draws no samples (the untrained model's are noise)
    runner._eval_point(checkpoint=False)
    assert "samples/text" in texts
    assert scalars["samples/duplicate_fraction"] == 0.75 and scalars["samples/distinct_1"] == 0.05
    assert scalars["samples/longest_run"] == 5.0
    assert any(m.startswith("warning (step 5): samples: repetition") for m in messages), messages
    assert any("collapse: 3 of 4 samples" in m for m in messages), messages
