"""`difflm doctor`: PASS on a good spec, FAIL (exit 1) on a summed loss (a test-only family) and on a learning
rate of 1e3, exit 2 on a spec error; the gradient and unknown-token verdicts on their own."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import Tensor

from difflm.data import PreparedData
from difflm.data.tokenization import ByteTokenizer
from difflm.families import registry
from difflm.families.base import LossOutput
from difflm.families.config import DiffusionConfig
from difflm.families.mdlm.model import MDLM
from difflm.models import Backbone, ModelConfig
from difflm.schedules import MDLM_SCHEDULES, get_schedule
from orchestrator.cli import main
from orchestrator.doctor.data import unknown_check
from orchestrator.doctor.dynamics import gradient_verdict

CHECKS = ("device", "engine", "precision", "data", "unknown tokens", "round trip", "model size", "loss at init",
          "gradients", "memorisation", "throughput")


def write_spec(tmp_path: Path, family: str = "mdlm", **train: Any) -> Path:
    import yaml

    spec = {
        "model": {"family": family, "size": "tiny"},
        "data": {"source": "builtin", "seq_len": 32, "max_documents": 200, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 50, "micro_batch_size": 4, "lr": 1e-3, "eval_every": 25, "checkpoint_every": 50, **train},
        "scaling": {"device": "cpu"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def doctor(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["doctor", *args])
    return result.exit_code, result.output


def status_of(output: str) -> dict[str, str]:
    """{check name: PASS|WARN|FAIL} from the doctor's lines."""
    out = {}
    for line in output.splitlines():
        head = line[:5].strip()
        if head in ("PASS", "WARN", "FAIL"):
            out[line[6:21].strip()] = head
    return out


def test_good_spec_passes_every_check(tmp_path: Path) -> None:
    code, out = doctor(str(write_spec(tmp_path)))
    assert code == 0, out
    assert status_of(out) == {name: "PASS" for name in CHECKS}, out
    assert "as expected for an untrained model" in out and "ETA" in out
    assert "11 PASS, 0 WARN, 0 FAIL" in out


def test_shipped_staged_atat_example_passes(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "sweeps" / "runs" / "atat_staged.yaml"
    code, out = doctor(str(example), "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "scaling.device=cpu")
    assert code == 0, out
    status = status_of(out)
    assert set(status.values()) == {"PASS"} and status["stages"] == "PASS", out
    assert "3 stages in one run: plain (100 steps), importance (100 steps), adaptive (200 steps)" in out
    # 7 backbone groups + 4 of the importance head, every one with a gradient (PASS: none missing)
    assert "11 layer groups" in next(ln for ln in out.splitlines() if ln.startswith("PASS  gradients"))


def test_learning_rate_of_1e3_fails_memorisation(tmp_path: Path) -> None:
    code, out = doctor(str(write_spec(tmp_path)), "--set", "train.lr=1e3")
    assert code == 1, out
    status = status_of(out)
    assert status["memorisation"] == "FAIL" and status["loss at init"] == "PASS", out
    assert "diverged at step" in out and "lower train.lr" in out


class SummedLossMDLM(MDLM):
    """The journal's bug on purpose: the loss summed over the sequence's tokens instead of averaged."""

    name = "mdlm_summed_loss"

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        out = super().forward(tokens, valid, generator)
        out.loss = out.loss * out.num_tokens
        return out


def build_summed(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, vocab_size: int, **_: Any) -> MDLM:
    d = model_cfg.dims()
    backbone = Backbone(vocab_size + 1, vocab_size + 1, d["d_model"], d["n_layers"], d["n_heads"], d["cond_dim"])
    return SummedLossMDLM(backbone, vocab_size, get_schedule(diffusion_cfg.schedule or "loglinear"))


def test_summed_loss_fails_the_loss_scale_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = registry.FamilySpec("mdlm_summed_loss", build_summed, MDLM_SCHEDULES, "test only: summed loss")
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)  # registered for this test only
    registry.registry_changed()  # the run spec's sections now include it
    try:
        code, out = doctor(str(write_spec(tmp_path, family="mdlm_summed_loss")))
    finally:
        monkeypatch.undo()
        registry.registry_changed()
    assert code == 1, out
    assert status_of(out)["loss at init"] == "FAIL", out
    line = next(ln for ln in out.splitlines() if ln.startswith("FAIL  loss at init"))
    ratio = float(line.split(" = ")[1].split(" x ")[0])
    assert ratio > 50  # ~ the 128 counted tokens of a 4 x 32 batch
    assert "summed over the sequence" in line


def test_spec_error_exits_2_before_any_check(tmp_path: Path) -> None:
    code, out = doctor(str(write_spec(tmp_path)), "--set", "train.lr=-1")
    assert code == 2 and "train.lr" in out and "PASS" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_fails_and_stops(tmp_path: Path) -> None:
    code, out = doctor(str(write_spec(tmp_path)), "--set", "scaling.device=cuda")
    assert code == 1, out
    assert status_of(out) == {"device": "FAIL"} and "has no GPU" in out


def test_gradient_verdicts() -> None:
    assert gradient_verdict({"a": 0.5, "b": 0.2}, 20).status == "PASS"
    nan = gradient_verdict({"a": 0.5, "b": math.nan}, 3)
    assert nan.status == "FAIL" and "NaN/Inf gradients at step 3 in b" in nan.message
    vanishing = gradient_verdict({"a": 0.5, "b": 1e-9}, 20)
    assert vanishing.status == "WARN" and "vanishing in b" in vanishing.message
    assert "no gradient reaches b" in gradient_verdict({"a": 0.5, "b": None}, 20).message
    assert gradient_verdict({"a": 5e4}, 20).status == "FAIL"


class UnkByteTokenizer(ByteTokenizer):
    @property
    def unk_id(self) -> int | None:
        return 7


@pytest.mark.parametrize(("share", "status"), [(0.0, "PASS"), (0.01, "WARN"), (0.2, "FAIL")])
def test_unknown_token_rate(share: float, status: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(10, 200, size=(100, 32)).astype(np.int32)
    train.ravel()[: int(share * train.size)] = 7
    data = PreparedData(train=train, val=train[:2], tokenizer=UnkByteTokenizer(), cache_dir=tmp_path, stats={})
    check = unknown_check(data)
    assert check.status == status, check.message
    assert f"{share:.2%}" in check.message
