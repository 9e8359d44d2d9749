"""`difflm bench gpu` (`make gpu-check`): the one-line skip without CUDA, and the report assembled from its steps'
results (faked here: the steps themselves need a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.bench.gpu import SKIP_LINE, StepResult, assemble, plan

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path needs a machine without CUDA")
def test_without_cuda_it_exits_0_after_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DIFFLM_GPU_REPORT_DIR": str(tmp_path / "report")}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "bench", "gpu"], capture_output=True, text=True,
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [SKIP_LINE]
    assert not (tmp_path / "report").exists() and not (tmp_path / "gpu-report").exists()


def _bench_paths(mfu: float, relative: float) -> dict:
    return {"peak": {"flops": 989.4e12, "source": "rated: NVIDIA H100 80GB HBM3"},
            "paths": [{"path": "bare", "utilisation": mfu, "relative": 1.0, "peak_memory_mb": 9000.0},
                      {"path": "deepspeed", "utilisation": mfu * 0.99, "relative": 0.99, "peak_memory_mb": 9100.0},
                      {"path": "train", "utilisation": mfu * relative, "relative": relative, "peak_memory_mb": 9300.0}]}


def test_report_states_the_targets_and_why_a_step_failed() -> None:
    results = [
        StepResult("doctor", ["difflm", "doctor"], "ok", 20.0, 0),
        StepResult("train_1_worker", ["difflm", "train"], "ok", 70.0, 0, data={"steps": 200}),
        StepResult("train_2_workers_one_gpu", ["difflm", "train"], "failed", 30.0, 1,
                   tail="...\nerror: NCCL error: Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000"),
        StepResult("bench", ["difflm", "bench"], "ok", 150.0, 0, data=_bench_paths(0.43, 0.95)),
        StepResult("sampling", ["difflm", "bench", "sampling"], "ok", 12.0, 0,
                   data={"table": "| samples | ddpm s |\n|---:|---:|\n| 1 | 1.00 |"}),
        StepResult("sweep_2_trials_one_gpu", ["difflm", "sweep"], "timeout", 120.0, None, tail="killed"),
    ]
    report, md = assemble(results, {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "cuda": "12.8"})
    v = report["verdicts"]
    assert v["mfu"]["value"] == pytest.approx(0.43) and v["mfu"]["met"] is True
    assert v["full_path_vs_bare"]["value"] == pytest.approx(0.95) and v["full_path_vs_bare"]["met"] is False
    assert v["peak_memory_mb"] == {"bare": 9000.0, "deepspeed": 9100.0, "train": 9300.0}
    assert v["two_workers_one_gpu"].startswith("failed: error: NCCL error: Duplicate GPU detected")
    assert report["ok"] is False  # the sweep timed out; the 2-workers probe alone would not fail the check
    assert report["total_s"] == pytest.approx(402.0)
    json.dumps(report)  # the JSON report is serialisable as is
    assert "- MFU (best path, bf16 dense peak): 43.0 % (target 40.0 %: met)" in md
    assert "- full `difflm train` vs bare loop: 0.950x (target 0.97x: NOT met)" in md
    assert "| sweep_2_trials_one_gpu | timeout | 120.0 | killed |" in md
    assert "| 1 | 1.00 |" in md

    ok = [r for r in results if r.name != "sweep_2_trials_one_gpu"]
    assert assemble(ok, {})[0]["ok"] is True


def test_the_plan_fits_the_lent_minutes_and_writes_its_specs(tmp_path: Path) -> None:
    from orchestrator.spec.run import RunSpec
    from orchestrator.spec.yamlio import read_yaml
    from orchestrator.sweep.spec import load_sweep_file

    steps = plan(tmp_path)
    assert [s.name for s in steps] == ["doctor", "train_1_worker", "train_2_workers_one_gpu", "bench", "sampling",
                                       "sweep_2_trials_one_gpu"]
    assert sum(s.timeout_s for s in steps) <= 8 * 60 - 60  # with a minute for the check's own start
    spec = RunSpec.model_validate(read_yaml(tmp_path / "base.yaml"))
    assert (spec.model.size, spec.data.seq_len, spec.train.precision, spec.train.max_steps) == ("base", 1024, "bf16", 200)
    assert spec.scaling.deepspeed and spec.scaling.zero_stage == 2 and spec.scaling.device == "cuda"
    sweep = load_sweep_file(str(tmp_path / "sweep.yaml"))
    assert sweep.scaling.gpus_per_worker == 0.5
