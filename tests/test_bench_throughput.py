"""`difflm bench` (training throughput): the report's shape, never its speed; peak/FLOP accounting;
``train.precision: auto``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.bench import peak
from orchestrator.bench.report import format_markdown
from orchestrator.spec.run import RunSpec
from orchestrator.train import precision as prec

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.slow
def test_quick_json_has_every_path_and_field(tmp_path: Path) -> None:
    proc = _cli("bench", "--quick", "--json", "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout is the report and nothing else
    assert [p["path"] for p in report["paths"]] == ["bare", "torch", "deepspeed", "train"]
    assert report["model"]["tokens_per_step"] == 2 * 32 and report["model"]["precision"] in ("fp32", "bf16")
    assert report["flops_per_step"] > 0 and report["peak"]["flops"] > 0 and report["peak"]["source"]
    assert report["command"] == "difflm bench --quick --json --output " + str(tmp_path)
    for row in report["paths"]:
        assert "error" not in row, row
        assert row["timed_steps"] == 2 and len(row["rounds_tokens_per_s"]) == 1
        assert row["tokens_per_s"] > 0 and 0 < row["step_ms_p50"] <= row["step_ms_p90"]
        assert row["achieved_flops"] > 0 and row["utilisation"] > 0 and row["relative"] > 0
        assert row["first_step_s"] > 0
        assert row["peak_memory_mb"] is None or row["peak_memory_mb"] >= 0
    assert report["paths"][0]["relative"] == 1.0
    train = report["paths"][3]
    assert (Path(report["folder"]) / "train-r1" / "summary.json").exists()
    assert train["label"].startswith("`difflm train`, 1 worker process")
    table = format_markdown(report).splitlines()
    rows = [ln for ln in table if ln.startswith("| ") and not ln.startswith("| path")]
    assert len(rows) == 4 and all(ln.count("|") == 10 for ln in rows)


def test_bad_options_are_user_errors(tmp_path: Path) -> None:
    proc = _cli("bench", "--paths", "bare,nope", "--output", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "nope: choose from bare,torch,deepspeed,train" in proc.stderr
    if not torch.cuda.is_available():
        proc = _cli("bench", "--device", "cuda", "--output", str(tmp_path), timeout=120)
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr, proc.stderr


def test_rated_peaks_by_device_name() -> None:
    assert peak.rated_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak.rated_peak("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert peak.rated_peak("NVIDIA H200", "fp32") == pytest.approx(66.9e12)
    assert peak.rated_peak("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert peak.rated_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 units: measured instead
    assert peak.rated_peak("Some Future GPU", "bf16") is None


def test_step_flops_counts_matmuls_and_attention() -> None:
    lin = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(8, 16)
    # forward 2*8*16*32, backward twice that (input and weight gradients); the input needs no grad here
    assert peak.step_flops(lambda: lin(x).sum().backward()) == 2 * 8 * 16 * 32 * 2
    q = torch.randn(2, 3, 10, 4)
    flops = peak.step_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 3 * 10 * 10 * 4)  # q @ k^T and p @ v, counted on the math backend


def test_measured_peak_is_positive() -> None:
    p = peak.device_peak(torch.device("cpu"), "fp32", n=64)
    assert p.flops > 0 and p.source.startswith("measured 64^3 fp32 matmul")


@pytest.mark.parametrize(
    ("native", "d_model", "vocab", "want"),
    [(True, 256, 259, "bf16"), (True, 768, 50257, "bf16"), (True, 128, 259, "fp32"), (True, 128, 8192, "bf16"),
     (True, 64, 8192, "fp32"), (False, 768, 50257, "fp32")],
)
def test_auto_precision_on_cpu(
    monkeypatch: pytest.MonkeyPatch, native: bool, d_model: int, vocab: int, want: str
) -> None:
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: native)
    spec = RunSpec.model_validate({"model": {"size": None, "d_model": d_model, "n_layers": 1, "n_heads": 4},
                                   "train": {"precision": "auto"}})
    resolved, why = prec.resolve_precision(spec, "cpu", vocab)
    assert resolved.train.precision == want and why is not None and why.startswith(f"precision {want} (auto: ")
    assert spec.train.precision == "auto"  # a copy: the caller's spec is untouched
    explicit = spec.model_copy(update={"train": spec.train.model_copy(update={"precision": "fp32"})})
    assert prec.resolve_precision(explicit, "cpu") == (explicit, None)
    assert prec.resolve_precision(spec, "mps")[0].train.precision == "fp32"


def test_paired_ratio_interval_resolves_what_the_rounds_allow() -> None:
    """The ratio is paired by round (drift cancels), its interval is over rounds and narrows with them."""
    from orchestrator.bench.throughput import paired_ratio

    bare = [100.0, 80.0, 120.0, 90.0]  # the machine drifts 50% between rounds
    same = paired_ratio([98.0, 78.4, 117.6, 88.2], bare)  # the path is 0.98x in every round
    assert same is not None and same["mean"] == pytest.approx(0.98) and same["se"] == pytest.approx(0.0, abs=1e-12)
    assert same["ci"] == pytest.approx([0.98, 0.98])  # unpaired medians would read 0.98 only by luck
    noisy = paired_ratio([97.0, 83.0, 114.0, 95.0, 99.0, 104.0], [100.0, 80.0, 120.0, 90.0, 100.0, 100.0])
    assert noisy is not None and noisy["ci"][0] < noisy["mean"] < noisy["ci"][1]
    assert noisy["rounds"] == pytest.approx([0.97, 1.0375, 0.95, 1.0556, 0.99, 1.04], abs=1e-4)
    assert paired_ratio([98.0, None, 99.0], [100.0, 100.0, 100.0])["ci"] is None  # type: ignore[index,list-item]
    assert paired_ratio([], []) is None


def test_report_says_whether_3_percent_is_resolved() -> None:
    from orchestrator.bench.report import resolution_lines

    def row(path: str, rel: float, ci: list[float] | None) -> dict[str, object]:
        return {"path": path, "relative": rel, "relative_se": 0.004, "relative_ci95": ci}

    lines = resolution_lines({"paths": [row("bare", 1.0, [1.0, 1.0]), row("train", 0.985, [0.975, 0.995]),
                                        row("torch", 0.95, [0.935, 0.96]), row("deepspeed", 0.97, [0.92, 1.02]),
                                        row("x", 0.99, None)]})
    assert lines[0] == ("- train: 0.985x ± 0.004 (SE), 95% interval [0.975, 0.995], 2.0% wide: resolves 3%; "
                        "at or above 0.97x")
    assert lines[1].endswith("2.5% wide: resolves 3%; below 0.97x")
    assert lines[2].endswith("10.0% wide: does NOT resolve 3%; not separated from 0.97x")
    assert "fewer than 3 paired rounds" in lines[3] and len(lines) == 4
