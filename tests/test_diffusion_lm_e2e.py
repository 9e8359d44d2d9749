"""diffusion_lm through the trainer: the per-worker Runner in process, every per-noise-bucket diagnostic logged.

Training under DeepSpeed ZeRO-2 and the CLI on the checkpoint are the family contract's
(tests/test_family_contract.py), as for every family."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from difflm.data import prepare_data
from difflm.families import build_model
from orchestrator.train.engine import TorchEngine
from orchestrator.train.runner import Runner, WorkerContext
from orchestrator.spec.run import RunSpec
from tests.helpers import RecordingLogger

BUCKET_TAGS = {f"val/{k}/{b}" for k in ("x0_cos", "x0_norm_ratio", "x0_acc", "input_dependence")
               for b in ("t000", "t025", "t075", "t085")}

@pytest.fixture
def one_thread() -> Iterator[None]:
    """A tiny model: one intra-op thread is faster than two and immune to oversubscribed shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_runner_logs_diagnostics(tmp_path: Path, one_thread: None) -> None:
    """In process, no Ray: 20 steps; val/nll falls and every diagnostic reaches the logger."""
    spec = RunSpec.model_validate({
        "model": {"family": "diffusion_lm", "size": None, "d_model": 32, "n_layers": 2, "n_heads": 2,
                  "cond_dim": 16, "embed_dim": 16},
        "diffusion": {"schedule": "sqrt", "sample_steps": 8, "clamp_sampling": True},
        "data": {"source": "builtin", "seq_len": 32, "max_documents": 200, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 20, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 10,
                  "checkpoint_every": 20, "log_every": 5, "num_samples": 1, "eval_batches": 4},
        "scaling": {"deepspeed": False, "device": "cpu"},
    })
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    torch.manual_seed(0)
    model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size)
    engine = TorchEngine(model, spec.train, torch.device("cpu"))
    log = RecordingLogger()
    Runner(spec, data, engine, WorkerContext(0, 1, torch.device("cpu")), logger=log).run()
    assert BUCKET_TAGS | {"val/embed_norm", "val/round_clean_acc", "train/mse", "train/rounding_nll"} <= set(log.scalars)
    nll = dict(log.scalars["val/nll"])
    assert sorted(nll) == [0, 10, 20] and all(math.isfinite(v) for v in nll.values())
    assert nll[20] < nll[0], nll
    assert len(log.texts["diagnostics/denoising"]) == 3 and "original: " in log.texts["diagnostics/denoising"][-1]
    assert len(log.texts["samples/text"]) == 2  # evals at 10 and 20: none of the untrained model at step 0
