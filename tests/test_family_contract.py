"""The contract every registered family keeps: one suite, parametrised over the registry at collection time.

A family gets these tests by registering (``register_family``; ``difflm new-family NAME`` scaffolds one),
so nothing here names a family. Each family is built from its own config classes at their defaults
(``FamilySpec.model_config`` / ``FamilySpec.config``) on a tiny backbone; :data:`TINY` shrinks a field a
family's default makes slow (diffusion_lm's 2000 steps), never a behaviour.

* memorise: a few AdamW steps on one batch drive the training loss well below its start;
* padding: positions outside ``valid`` / ``counted`` are never noised or counted (token counts, empty
  rows cost exactly 0 in training and validation, whatever their tokens);
* val invariance: ``val_nll`` reads only the shared :class:`~difflm.types.ValNoise` (bit-identical on a
  repeat, no hidden generator), and a sequence's draws do not depend on the other sequences of its batch
  (up to float rounding of batched matmuls, as :func:`difflm.evaluation.val_pass` promises);
* sampling: every registered sampler gives (num, length) int64 ids in [0, vocab), reproducible per seed;
* checkpoint: weights through safetensors (what a run folder holds) into a differently seeded model give
  bit-identical ``val_nll`` and training loss;
* trainer and CLI: the worker's Runner under DeepSpeed ZeRO-2 (in process, no Ray) logs the family's loss
  metrics and diagnostics and its val/nll falls; ``difflm sample|eval|denoise`` read the checkpoint
  (eval reproduces training's val/nll; denoise works, or exits 2 for a family without the hook).

:func:`contract_cases` is reused by tests/test_new_family.py on a scaffolded family.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from difflm.data import prepare_data
from difflm.evaluation import counted_positions, make_val_noise
from difflm.families import build_model, family_names, get_family
from difflm.families.base import Family
from difflm.sampling import SampleOptions, get_sampler
from difflm.types import Denoiser, Diagnoser
from orchestrator.build import build_run
from orchestrator.cli import main
from orchestrator.spec.run import RunSpec
from orchestrator.train.runner import WorkerContext
from tests.helpers import CKPT_NAME, CPU, RecordingLogger, single_process_group
from tests.helpers import one_thread, randomize_zero_init  # noqa: F401  (one_thread: autouse fixture)

V, L = 24, 16
#: tiny backbone dims for every family
DIMS: dict[str, Any] = {"size": None, "d_model": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16}
#: per-family field values that only make a default cheaper to run (never a different behaviour)
TINY: dict[str, dict[str, dict[str, Any]]] = {
    "diffusion_lm": {"model": {"embed_dim": 16}, "diffusion": {"timesteps": 100}},
}


def make(family: str, seed: int = 0, randomize: bool = True) -> Family:
    """Family ``family`` from its own config classes at their defaults, tiny dims, weights from ``seed``.

    randomize: zero-initialised output layers get random weights, so outputs depend on the input (a
    family at init is a constant predictor; contract checks on inputs would pass vacuously)."""
    spec = get_family(family)
    extra = TINY.get(family, {})
    model_cfg = spec.model_config(family=family, **DIMS, **extra.get("model", {}))
    diffusion_cfg = spec.config(**extra.get("diffusion", {}))
    torch.manual_seed(seed)
    model = build_model(model_cfg, diffusion_cfg, V, bos_id=1, eos_id=2, pad_id=0)
    if randomize:
        randomize_zero_init(model)
    return model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(rows: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (rows, L), generator=gen(seed))


def sampler_cases() -> list[Any]:
    return [pytest.param(f, s, id=f"{f}-{s}") for f in family_names() for s in get_family(f).samplers]


# ---- the checks, as functions of a family name (tests/test_new_family.py runs them on a scaffold) ----


def check_memorises_a_batch(family: str) -> None:
    """100 AdamW steps on one repeated batch drive the mean training loss below 0.4 of its start (measured
    2026-12-06: 0.0 (ar) to 0.29 (mdlm) of it). The sequence repeats a period of 4, so a masked position is
    predictable from its visible neighbours (rotary positions are relative: a fully masked input cannot
    say which absolute position is which)."""
    model = make(family, randomize=False)
    model.train()
    tokens = torch.tensor([3, 4, 5, 6] * (L // 4)).repeat(4, 1)  # (4, L) one sequence, four rows
    valid = counted_positions(tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def mean_loss() -> float:  # fixed draws, so the before/after numbers are comparable
        with torch.no_grad():
            return sum(float(model(tokens, valid, gen(100 + i)).loss) for i in range(4)) / 4

    start = mean_loss()
    g = gen(0)
    for _ in range(100):
        loss = model(tokens, valid, g).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    end = mean_loss()
    assert end < 0.4 * start, f"{family}: loss {start:.3f} -> {end:.3f} after 100 steps on one batch"


def check_padding_ignored(family: str) -> None:
    """Positions outside ``valid`` are never noised or counted: the token count is valid's, a row with no
    valid position costs exactly 0 whatever its tokens (loss, nll_sum, gradients), and in validation a row
    with nothing counted scores exactly 0 in every draw."""
    model = make(family)
    model.train()
    tokens = batch(3)
    valid = counted_positions(tokens)
    valid[1, 9:] = False
    out = model(tokens, valid, gen(0))
    assert int(out.num_tokens) == int(valid.sum()), f"{family}: counted {int(out.num_tokens)} of {int(valid.sum())}"
    assert torch.isfinite(out.loss) and float(out.loss.detach()) > 0
    none = torch.zeros_like(valid)
    for seed in range(3):
        other = batch(3, seed=10 + seed)  # any tokens at the (all invalid) positions
        empty = model(other, none, gen(seed))
        assert float(empty.loss.detach()) == 0.0 and float(empty.nll_sum) == 0.0 and int(empty.num_tokens) == 0, family
        model.zero_grad()
        empty.loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in model.parameters()), f"{family}: padding has a gradient"
    model.eval()
    counted = counted_positions(tokens)
    counted[2] = False  # row 2: nothing counted
    with torch.no_grad():
        v = model.val_nll(tokens, counted, make_val_noise([0, 1, 2], 3, L, seed=7))
    assert v.shape == (3, 3)
    assert torch.equal(v[2], torch.zeros_like(v[2])), f"{family}: an uncounted row scores {v[2].tolist()}"
    assert torch.all(v[:2].sum(dim=1) > 0), family


def check_val_invariance(family: str) -> None:
    """val_nll uses only the ValNoise (a repeat is bit-identical; the global RNG does not matter), and
    sequence i's draws are the same alone, in another batch, or next to other tokens."""
    model = make(family).eval()
    tokens = batch(3)
    counted = counted_positions(tokens)
    noise = make_val_noise([4, 5, 6], 4, L, seed=11)
    with torch.no_grad():
        a = model.val_nll(tokens, counted, noise)
        torch.manual_seed(12345)  # a family drawing from the global RNG would change the repeat
        b = model.val_nll(tokens, counted, noise)
        assert a.dtype == torch.float64 and a.shape == (3, 4)
        assert torch.equal(a, b), f"{family}: val_nll is not a function of the noise alone"
        alone = model.val_nll(tokens[1:2], counted[1:2], make_val_noise([5], 4, L, seed=11))
        torch.testing.assert_close(alone[0], a[1], rtol=1e-5, atol=1e-6)
        swapped = torch.stack([batch(1, seed=99)[0], tokens[1], tokens[0]])  # (3, L) other neighbours, order
        c = model.val_nll(swapped, counted_positions(swapped), make_val_noise([9, 5, 4], 4, L, seed=11))
        torch.testing.assert_close(c[1], a[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c[2], a[0], rtol=1e-5, atol=1e-6)
        other_seed = model.val_nll(tokens, counted, make_val_noise([4, 5, 6], 4, L, seed=12))
    if not getattr(model, "exact_likelihood", False):  # an exact NLL (ar) reads no noise at all
        assert not torch.equal(other_seed, a), f"{family}: val_nll ignores the val noise"


def check_sampler(family: str, sampler: str) -> None:
    """Sampler ``sampler`` gives (num, length) int64 ids in [0, vocab) with no prompt positions, the same
    ones for the same seed; the default one is what ``Family.sample`` runs."""
    model = make(family).eval()
    fn = get_sampler(model, sampler)
    out = fn(SampleOptions(num=3, length=L, steps=4), gen(0))
    assert out.tokens.shape == (3, L) and out.tokens.dtype == torch.int64, (family, sampler)
    assert torch.all((out.tokens >= 0) & (out.tokens < V)), f"{family}/{sampler}: ids outside the vocab"
    assert out.fixed.shape == (3, L) and out.fixed.dtype == torch.bool and not out.fixed.any()
    assert isinstance(out.nfe, int) and out.nfe >= 1
    assert torch.equal(out.tokens, fn(SampleOptions(num=3, length=L, steps=4), gen(0)).tokens)
    assert not torch.equal(out.tokens, fn(SampleOptions(num=3, length=L, steps=4), gen(1)).tokens)
    if sampler == model.default_sampler:
        assert torch.equal(out.tokens, model.sample(3, L, 4, gen(0)))


def check_checkpoint_round_trip(family: str, tmp_path: Path) -> None:
    """Weights saved as safetensors (as a run's checkpoint holds them) and loaded into a model built from
    another seed give bit-identical val_nll and training loss."""
    model = make(family, seed=0)
    other = make(family, seed=1)
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    tokens = batch(2)
    counted = counted_positions(tokens)
    noise = make_val_noise([0, 1], 3, L, seed=3)
    with torch.no_grad():
        assert not torch.equal(model.eval().val_nll(tokens, counted, noise), other.eval().val_nll(tokens, counted, noise))
        other.load_state_dict(load_file(str(path)), strict=True)
        assert torch.equal(model.val_nll(tokens, counted, noise), other.val_nll(tokens, counted, noise)), family
        model.train(), other.train()
        assert torch.equal(model(tokens, counted, gen(4)).loss, other(tokens, counted, gen(4)).loss), family


def run_spec(family: str, cache: Path) -> RunSpec:
    """A tiny run of ``family``: 16 steps of ZeRO-2 on the CPU, evals at 0, 8, 16, one sample text."""
    extra = TINY.get(family, {})
    diffusion = dict(extra.get("diffusion", {}))
    if "sample_steps" in get_family(family).config.model_fields:
        diffusion["sample_steps"] = 4
    return RunSpec.model_validate({
        "model": {"family": family, **DIMS, **extra.get("model", {})},
        "diffusion": diffusion,
        "data": {"source": "builtin", "seq_len": 24, "max_documents": 120, "cache_dir": str(cache)},
        "train": {"max_steps": 16, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 8,
                  "checkpoint_every": 16, "log_every": 4, "num_samples": 1, "eval_batches": 2},
        "scaling": {"deepspeed": True, "zero_stage": 2, "device": "cpu"},
    })


def check_trains_and_the_cli_reads_its_checkpoint(family: str, root: Path) -> None:
    """The worker's path in process: build_run (DeepSpeed ZeRO-2), Runner.run, save; then the CLI on the run."""
    spec = run_spec(family, root / "cache")
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    log = RecordingLogger()
    torch.manual_seed(0)
    built = build_run(spec, data, CPU, ctx=WorkerContext(0, 1, CPU), backend="deepspeed", logger=log)
    runner = built.runner
    assert runner is not None
    runner.run()
    model = built.model
    tokens = torch.tensor(data.val[:2], dtype=torch.long)
    model.train()
    wanted = {"train/loss", *(f"train/{k}" for k in model(tokens, counted_positions(tokens), gen(0)).metrics)}
    model.eval()
    if isinstance(model, Diagnoser):
        with torch.no_grad():
            diag = model.diagnostics(tokens, gen(0), data.tokenizer.decode)
        wanted |= {f"val/{k}" for k in diag.scalars}
    assert wanted <= set(log.scalars), f"{family}: not logged: {sorted(wanted - set(log.scalars))}"
    nll = dict(log.scalars["val/nll"])
    assert sorted(nll) == [0, 8, 16] and all(math.isfinite(v) for v in nll.values()), nll
    assert nll[16] < nll[0], f"{family}: val/nll did not fall: {nll}"
    se = dict(log.scalars["val/nll_se"])[16]  # an exact NLL (ar) has no noise: standard error 0; a bound has some
    assert (se == 0.0) if model.exact_likelihood else (0.0 < se < math.inf), (family, se)
    assert len(log.texts["samples/text"]) == 2  # evals at 8 and 16
    run_dir = root / family
    runner.save(run_dir / CKPT_NAME)
    (run_dir / "checkpoints").mkdir()
    for link in ("best", "last"):
        (run_dir / "checkpoints" / link).symlink_to(f"../{CKPT_NAME}")

    def cli(*args: str) -> Any:
        return CliRunner().invoke(main, [*args, "--device", "cpu"], catch_exceptions=False)

    sampled = cli("sample", str(run_dir), "--num", "2", "--steps", "4")
    assert sampled.exit_code == 0 and f"sampler     {model.default_sampler}: 2 x " in sampled.output, sampled.output
    ev = cli("eval", str(run_dir))
    assert ev.exit_code == 0 and "(reproduced, to float rounding)" in ev.output, ev.output
    den = cli("denoise", str(run_dir), "--text", "The capital of France", "--t", "0.3,0.9")
    if isinstance(model, Denoiser):
        assert den.exit_code == 0 and den.output.count("token accuracy") == 2, den.output
    else:
        assert den.exit_code == 2 and "no denoise hook" in den.output, den.output


# ---- the suite ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", family_names())
def test_memorises_a_batch(family: str) -> None:
    check_memorises_a_batch(family)


@pytest.mark.parametrize("family", family_names())
def test_padding_ignored(family: str) -> None:
    check_padding_ignored(family)


@pytest.mark.parametrize("family", family_names())
def test_val_invariance(family: str) -> None:
    check_val_invariance(family)


@pytest.mark.parametrize(("family", "sampler"), sampler_cases())
def test_sampler_shapes(family: str, sampler: str) -> None:
    check_sampler(family, sampler)


@pytest.mark.parametrize("family", family_names())
def test_checkpoint_round_trip(family: str, tmp_path: Path) -> None:
    check_checkpoint_round_trip(family, tmp_path)


@pytest.mark.parametrize("family", family_names())
def test_every_family_registers_a_sampler(family: str) -> None:
    """``difflm sample`` and training's sample texts need one: the default is among the registered ones."""
    spec = get_family(family)
    assert spec.samplers, f"family {family} registers no samplers (FamilySpec.samplers)"
    assert make(family).default_sampler in spec.samplers


@pytest.mark.parametrize("family", family_names())
def test_trains_and_the_cli_reads_its_checkpoint(family: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    single_process_group()
    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed asks for it even with a process group in place
    check_trains_and_the_cli_reads_its_checkpoint(family, tmp_path)
