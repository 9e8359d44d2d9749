"""sedd and bijective end to end: `difflm train` (Ray Train + DeepSpeed ZeRO-2, one CPU worker) for each family on
one shared Ray instance, then `difflm sample|eval|denoise` on the checkpoints it wrote.

The two trainings run in this process through the click command, so the second one joins the Ray instance the
first started (``launch.init_ray`` keeps an initialised Ray); the fixture shuts it down. Slow: Ray start ~20 s,
then 30 tiny steps per family. The uniform-graph CLI test trains in process (no Ray).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from orchestrator.cli import main
from orchestrator.train.metrics import read_scalars
from tests.helpers import make_run_dir

SPEC = """
model:
  family: {family}
  size: null
  d_model: 32
  n_layers: 2
  n_heads: 2
  cond_dim: 16
diffusion:
  sample_steps: 8
data:
  source: builtin
  seq_len: 32
  max_documents: 200
  cache_dir: {cache}
train:
  max_steps: 30
  micro_batch_size: 8
  lr: 3.0e-3
  warmup_steps: 3
  eval_every: 15
  checkpoint_every: 30
  log_every: 5
  num_samples: 1
  eval_batches: 4
scaling:
  num_workers: 1
  device: cpu
  cpus_per_worker: 1
  zero_stage: 2
"""

FAMILY_TAGS = {
    "sedd": {"train/score_entropy", "train/noised_rate"},
    "bijective": {"train/denoise_nelbo", "train/likelihood", "train/flow_nll", "train/logdet",
                  "val/flow_logdet", "val/flow_inverse_rel_err"},
}


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, [*args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Result, Path]]]:
    """`difflm train` for sedd, then bijective, on one Ray instance (started by the first run)."""
    import ray

    root = tmp_path_factory.mktemp("families")
    env = dict(os.environ)
    out: dict[str, tuple[Result, Path]] = {}
    try:
        for family in ("sedd", "bijective"):
            spec = root / f"{family}.yaml"
            spec.write_text(SPEC.format(family=family, cache=root / "cache"))
            res = cli("train", str(spec), "--output", str(root / "runs"), "--name", family)
            out[family] = (res, root / "runs" / family)
        yield out
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(env)  # init_ray exported Ray's settings into this process


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sedd", "bijective"])
def test_train_logs_family_metrics_and_val_nll_falls(trained: dict[str, tuple[Result, Path]], family: str) -> None:
    res, run_dir = trained[family]
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and f"model: {family}" in res.output
    scalars = read_scalars(run_dir / "tensorboard")
    assert FAMILY_TAGS[family] | {"train/loss", "val/nll", "val/ppl"} <= set(scalars)
    val = dict(scalars["val/nll"])
    assert sorted(val) == [0, 15, 30] and all(math.isfinite(v) for v in val.values())
    assert val[30] < val[0] - 0.3, val
    if family == "bijective":
        # the two loss components and the weight: loss = denoise + 0.001 * likelihood at every log point
        loss, den, lik = (dict(scalars[f"train/{k}"]) for k in ("loss", "denoise_nelbo", "likelihood"))
        for step in loss:
            assert loss[step] == pytest.approx(den[step] + 0.001 * lik[step], rel=1e-4)
        assert max(abs(v) for _, v in scalars["train/logdet"]) > 0.0
        assert max(v for _, v in scalars["val/flow_inverse_rel_err"]) < 1e-3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["best_val_nll"] == pytest.approx(min(val.values()), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sedd", "bijective"])
def test_sample_eval_denoise_from_the_checkpoint(trained: dict[str, tuple[Result, Path]], family: str) -> None:
    res, run_dir = trained[family]
    assert res.exit_code == 0, res.output
    sampler = "euler" if family == "sedd" else "ddpm_cache"
    s = cli("sample", str(run_dir), "--num", "2", "--steps", "6", "--sampler", sampler,
            "--prompt", "The [MASK:4] of", "--device", "cpu")
    assert s.exit_code == 0, s.output
    assert f"sampler     {sampler}: 2 x " in s.output and "(infill: 4 of" in s.output
    assert sum(line.startswith("[") and "The " in line and " of" in line for line in s.output.splitlines()) == 2
    e = cli("eval", str(run_dir), "--device", "cpu")
    assert e.exit_code == 0, e.output
    assert "NLL bound" in e.output and "(reproduced, to float rounding)" in e.output, e.output  # training's val/nll
    d = cli("denoise", str(run_dir), "--text", "The capital of France is Paris.", "--t", "0.3,0.9", "--device", "cpu")
    assert d.exit_code == 0, d.output
    assert d.output.count("token accuracy") == 2 and "reconstructed" in d.output


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
