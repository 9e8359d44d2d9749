"""sedd's uniform graph through the CLI (trained in process, no Ray).

Every family's run through the trainer (DeepSpeed ZeRO-2, its metrics and diagnostics logged, val/nll
falling) and `difflm sample|eval|denoise` on its checkpoint are the family contract's
(tests/test_family_contract.py::test_trains_and_the_cli_reads_its_checkpoint), in process; Ray Train's
own path is family-blind and tested once (tests/test_train_e2e.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner, Result

from orchestrator.cli import main
from tests.helpers import make_run_dir


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, [*args], catch_exceptions=False)


def test_uniform_graph_through_the_cli(tmp_path: Path) -> None:
    """sedd with the uniform graph: a run dir trained in process, then sample (analytic), eval (K = 2) and denoise;
    a uniform spec without time conditioning is refused before anything runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = make_run_dir(tmp_path, "uniform", {
            "model": {"family": "sedd", "size": None, "d_model": 32, "n_layers": 1, "n_heads": 2, "cond_dim": 16,
                      "time_conditioning": True},
            "diffusion": {"graph": "uniform", "schedule": "geometric", "sample_steps": 4},
            "data": {"source": "builtin", "seq_len": 24, "max_documents": 100, "cache_dir": str(tmp_path / "c")},
            "train": {"max_steps": 4, "micro_batch_size": 4, "eval_every": 4, "checkpoint_every": 4,
                      "num_samples": 0, "eval_batches": 2},
            "scaling": {"deepspeed": False, "device": "cpu"},
        }, steps=4)
    finally:
        torch.set_num_threads(before)
    s = cli("sample", str(run), "--num", "2", "--steps", "4", "--prompt", "Hi [MASK:3]!", "--device", "cpu")
    assert s.exit_code == 0, s.output
    assert "sampler     analytic" in s.output and "(infill: 3 of 8 tokens generated)" in s.output
    e = cli("eval", str(run), "--samples", "2", "--max-batches", "1", "--device", "cpu")
    assert e.exit_code == 0 and "MC error    ±" in e.output, e.output
    d = cli("denoise", str(run), "--text", "abc def", "--t", "0.9", "--device", "cpu")
    assert d.exit_code == 0 and "uniform graph" in d.output and "_" in d.output.split("corrupted     ")[1], d.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  family: sedd\ndiffusion:\n  graph: uniform\n")
    v = cli("validate", str(bad))
    assert v.exit_code == 2 and "needs model.time_conditioning: true" in v.output, v.output
