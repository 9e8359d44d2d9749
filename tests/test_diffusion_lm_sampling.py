"""diffusion_lm in `difflm sample|eval|denoise`: the ancestral / ancestral_clamp samplers (prompts by
inpainting, temperature as DDIM eta, seeds), denoise (cosine similarity), the K-draw val estimator and
the CLI on a tiny checkpoint made in-process."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from torch import Tensor, nn

from difflm.families.diffusion_lm.model import ContinuousDenoiseResult, DiffusionLM
from difflm.families.diffusion_lm.gaussian import get_gaussian_schedule, posterior_coefs
from difflm.families.diffusion_lm.denoiser import DiTDenoiser
from difflm.sampling import SampleOptions, SamplingError, get_sampler
from difflm.families.diffusion_lm.samplers import step_coefs
from tests.helpers import randomize_zero_init

V, E = 40, 16
SENTENCES = [
    b"the quick brown fox jumps over t",
    b"a lazy dog sleeps in the warm su",
    b"colorless green ideas sleep furi",
    b"we hold these truths to be self-",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread avoids oversubscribing the shared cores (speed only)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(T: int = 200, clamp_sampling: bool = False) -> DiffusionLM:
    """A random tiny model (zero-initialised layers randomised, so x0_hat depends on the input)."""
    torch.manual_seed(0)
    m = DiffusionLM(DiTDenoiser(E, 32, 2, 4, 16), V, E, get_gaussian_schedule("sqrt", T), clamp_sampling=clamp_sampling)
    randomize_zero_init(m)
    return m.eval()


def run(m: DiffusionLM, name: str, seed: int = 0, **kw: object):  # type: ignore[no-untyped-def]
    return get_sampler(m, name)(SampleOptions(**kw), gen(seed))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained() -> tuple[DiffusionLM, Tensor]:
    """A tiny model trained 150 steps on 4 byte sentences (~3 s on one core)."""
    torch.manual_seed(0)
    tokens = torch.tensor([list(s) for s in SENTENCES])  # (4, 32)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    m = DiffusionLM(DiTDenoiser(E, 64, 2, 4, 32), 256, E, get_gaussian_schedule("sqrt", 2000))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = gen(0)
    for _ in range(150):
        out = m(tokens, valid, g)
        opt.zero_grad()
        out.loss.backward()
        nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    return m.eval(), tokens


# ---- samplers -------------------------------------------------------------------------------------


def test_sampler_names_and_default_follow_clamp_sampling() -> None:
    assert list(make().samplers()) == ["ancestral", "ancestral_clamp"] and make().default_sampler == "ancestral"
    clamped = make(clamp_sampling=True)
    assert clamped.default_sampler == "ancestral_clamp" and set(clamped.samplers()) == {"ancestral", "ancestral_clamp"}
    with pytest.raises(SamplingError, match="choose one of ancestral, ancestral_clamp"):
        get_sampler(make(), "ddpm")


@pytest.mark.parametrize("name", ["ancestral", "ancestral_clamp"])
def test_samples_valid_ids_of_the_right_shape(name: str) -> None:
    m = make()
    out = run(m, name, num=3, length=12, steps=8)
    assert out.tokens.shape == (3, 12) and out.tokens.dtype == torch.int64
    assert torch.all((out.tokens >= 0) & (out.tokens < V))
    assert out.fixed.shape == (3, 12) and not out.fixed.any()
    assert out.nfe == len(m.sampling_steps(8)) == 8 and out.notes == []
    too_many = run(make(T=10), name, num=1, length=4, steps=50)
    assert too_many.nfe == 10 and "50 steps asked, 10 run" in too_many.notes[0]


def test_same_seed_same_samples_and_model_sample_agrees() -> None:
    m = make()
    for name in ("ancestral", "ancestral_clamp"):
        a = run(m, name, seed=3, num=3, length=10, steps=6).tokens
        assert torch.equal(a, run(m, name, seed=3, num=3, length=10, steps=6).tokens)
        assert not torch.equal(a, run(m, name, seed=4, num=3, length=10, steps=6).tokens)
        if name == m.default_sampler:  # Family.sample (derived from the registry) runs the default sampler
            assert torch.equal(a, m.sample(3, 10, 6, gen(3)))
    # clamping changes the chain
    assert not torch.equal(run(m, "ancestral", num=3, length=10, steps=6).tokens,
                           run(m, "ancestral_clamp", num=3, length=10, steps=6).tokens)


@pytest.mark.parametrize("name", ["ancestral", "ancestral_clamp"])
def test_prefix_and_infill_positions_never_change(name: str) -> None:
    m = make()
    L = 14
    template = torch.randint(0, V, (L,), generator=gen(5))
    prefix = torch.zeros(L, dtype=torch.bool)
    prefix[:5] = True
    infill = torch.ones(L, dtype=torch.bool)
    infill[4:9] = False  # "text [MASK:5] text"
    for fixed in (prefix, infill):
        out = run(m, name, num=4, length=L, steps=10, template=template, fixed=fixed, temperature=0.7)
        assert torch.equal(out.fixed, fixed.expand(4, L))
        assert torch.equal(out.tokens[:, fixed], template[fixed].expand(4, -1))
        assert torch.all((out.tokens >= 0) & (out.tokens < V))
    # one template per row
    rows = torch.randint(0, V, (2, L), generator=gen(6))
    fixed2 = torch.stack([prefix, infill])
    out = run(m, name, num=2, length=L, steps=5, template=rows, fixed=fixed2)
    assert torch.equal(out.tokens[fixed2], rows[fixed2])


def test_inpainting_feeds_correctly_noised_prompt_embeddings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before every call the fixed rows of x_t are EMB(w) noised to step t as training does:
    mean sqrt(ab_t) EMB(w), variance 1 - ab_t ab_0 (x_start's beta_0 noise, then q(x_t | x_start))."""
    m = make()
    L, N = 12, 6
    template = torch.randint(0, V, (L,), generator=gen(7))
    fixed = torch.zeros(L, dtype=torch.bool)
    fixed[:6] = True
    seen: list[tuple[Tensor, Tensor]] = []
    real = m.predict_x0

    def spy(x: Tensor, t: Tensor) -> Tensor:
        seen.append((x.clone(), t.clone()))
        return real(x, t)

    monkeypatch.setattr(m, "predict_x0", spy)
    run(m, "ancestral", num=N, length=L, steps=5, template=template, fixed=fixed)
    assert [int(t[0]) for _, t in seen] == m.sampling_steps(5)
    ab = m.schedule.alpha_bar.float()
    emb = m.embed(template[fixed]).detach()  # (6, E)
    for x, t in seen:
        s = int(t[0])
        z = (x[:, fixed] - ab[s].sqrt() * emb) / (1 - ab[s] * ab[0]).sqrt()  # (N, 6, E): standard normal
        assert abs(z.mean().item()) < 0.15 and 0.85 < z.std().item() < 1.15, (s, z.mean(), z.std())


def test_temperature_is_ddim_eta() -> None:
    sched = get_gaussian_schedule("sqrt", 100)
    ab = sched.alpha_bar
    for t, s in ((99, 50), (40, 39), (10, 0)):
        post = posterior_coefs(ab[t], ab[s])
        c = step_coefs(ab[t], ab[s], 1.0)
        assert (c[0], c[1], c[2]) == (post.coef_x0, post.coef_xt, post.var.sqrt())  # exactly the posterior
        near = step_coefs(ab[t], ab[s], 1.0 - 1e-9)  # the general (DDIM) form agrees at eta = 1
        for a, b in zip(near, c):  # (its eps_hat weight is ill-conditioned there when alpha_bar_t is tiny)
            assert float(a) == pytest.approx(float(b), rel=1e-3)
        for tau in (0.0, 0.5, 1.0):
            cx0, cxt, std = step_coefs(ab[t], ab[s], tau)
            # a perfect x0_hat maps the marginal of x_t onto the marginal of x_s
            assert float(cx0 + cxt * ab[t].sqrt()) == pytest.approx(float(ab[s].sqrt()), rel=1e-9)
            assert float(cxt**2 * (1 - ab[t]) + std**2) == pytest.approx(float(1 - ab[s]), rel=1e-9)
        assert float(step_coefs(ab[t], ab[s], 0.0)[2]) == 0.0
    m = make()
    cold = run(m, "ancestral", num=3, length=8, steps=6, temperature=0.0).tokens
    assert torch.equal(cold, run(m, "ancestral", num=3, length=8, steps=6, temperature=0.0).tokens)
    assert not torch.equal(cold[0], cold[1])  # the starting noise is not scaled: rows still differ
    assert not torch.equal(cold, run(m, "ancestral", num=3, length=8, steps=6).tokens)


def test_unsupported_options_are_clear_errors() -> None:
    m = make()
    with pytest.raises(SamplingError, match="top-p does not apply"):
        run(m, "ancestral", num=1, length=4, steps=2, top_p=0.9)
    with pytest.raises(SamplingError, match="remasking"):
        run(m, "ancestral_clamp", num=1, length=4, steps=2, remasking="low_confidence")
    with pytest.raises(SamplingError, match="--block"):
        run(m, "ancestral", num=1, length=4, steps=2, window=4, stride=2)
    longer = run(m, "ancestral", num=1, length=12, steps=2, window=8)
    assert longer.tokens.shape == (1, 12) and "in one piece" in longer.notes[0]


def test_trained_infilling_samples_mostly_training_bytes(trained: tuple[DiffusionLM, Tensor]) -> None:
    m, tokens = trained
    fixed = torch.ones(32, dtype=torch.bool)
    fixed[10:16] = False
    out = run(m, "ancestral_clamp", num=4, length=32, steps=40, template=tokens[0], fixed=fixed)
    assert torch.equal(out.tokens[:, fixed], tokens[0][fixed].expand(4, -1))
    allowed = set(b"".join(SENTENCES))
    free = out.tokens[:, ~fixed].flatten().tolist()
    assert sum(i in allowed for i in free) / len(free) > 0.7, bytes(free)


# ---- denoise ---------------------------------------------------------------------------------------


def test_denoise_cosine_falls_with_noise(trained: tuple[DiffusionLM, Tensor]) -> None:
    m, tokens = trained
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[:, 0] = valid[:, -1] = False  # as `difflm denoise`: BOS/EOS stay clean
    low = m.denoise(tokens, valid, 0.0, gen(0))
    high = m.denoise(tokens, valid, 0.9, gen(0))
    for res in (low, high):
        assert isinstance(res, ContinuousDenoiseResult) and res.corrupted is None and res.noised is None
        assert res.reconstructed.shape == tokens.shape
        assert torch.equal(res.reconstructed[~valid], tokens[~valid])  # untouched context
        assert set(res.metrics) == {"accuracy", "cosine", "norm_ratio", "xt_accuracy"}
        assert res.corrupted_view is not None and res.corrupted_view.shape == tokens.shape
        assert "one-shot" in res.method
    # measured after 150 steps: cosine 0.979 / 0.475, accuracy 0.992 / 0.242, x_t rounding 1.0 / 0.042
    assert low.metrics["cosine"] > 0.9 and low.metrics["accuracy"] > 0.9, low.metrics
    assert high.metrics["cosine"] < low.metrics["cosine"] - 0.2, (low.metrics, high.metrics)
    assert high.metrics["xt_accuracy"] < low.metrics["xt_accuracy"]
    sampled = m.denoise(tokens, valid, 0.3, gen(0), steps=5)
    assert "ancestral sampler" in sampled.method and math.isfinite(sampled.metrics["cosine"])
    assert torch.equal(sampled.reconstructed[~valid], tokens[~valid])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        m.denoise(tokens, valid, 1.5, gen(0))


def test_denoise_noise_level_maps_to_steps() -> None:
    m = make(T=101)
    assert [m.denoise_step_index(t) for t in (0.0, 0.5, 1.0)] == [0, 50, 100]
    assert m.sampling_steps(3, start=50) == [50, 25, 0] and m.sampling_steps(100, start=2) == [2, 1, 0]
    assert m.sampling_steps(4, start=0) == [0]


# ---- eval: K draws -------------------------------------------------------------------------------


def test_val_nll_common_random_numbers_and_stratified_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequence's K draws depend on its val noise only (not on its batch), and its K steps come from K strata."""
    from difflm.evaluation import counted_positions, make_val_noise

    m = make()
    tokens = torch.randint(0, V, (4, 12), generator=gen(0))
    counted = counted_positions(tokens)
    with torch.no_grad():
        whole = m.val_nll(tokens, counted, make_val_noise([0, 1, 2, 3], 4, 12, seed=3))  # (4, 4)
        alone = m.val_nll(tokens[2:3], counted[2:3], make_val_noise([2], 4, 12, seed=3))  # (1, 4)
        other_seed = m.val_nll(tokens, counted, make_val_noise([0, 1, 2, 3], 4, 12, seed=4))
    assert whole.shape == (4, 4) and whole.dtype == torch.float64 and torch.isfinite(whole).all()
    torch.testing.assert_close(alone[0], whole[2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other_seed, whole)
    seen: list[Tensor] = []
    real = m.steps_from_uniform

    def spy(u: Tensor, importance: bool) -> tuple[Tensor, Tensor]:
        seen.append(u.clone())
        return real(u, importance)

    monkeypatch.setattr(m, "steps_from_uniform", spy)
    with torch.no_grad():
        m.val_nll(tokens, counted, make_val_noise([0, 1, 2, 3], 4, 12, seed=3))
    u = torch.stack(seen, dim=1)  # (B, K)
    assert (u * 4).floor().long().tolist() == [[0, 1, 2, 3]] * 4  # draw k in the k-th quarter, every sequence


# ---- CLI -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusion_lm run dir as `difflm train` leaves it (8 steps, no Ray)."""
    from tests.helpers import make_run_dir

    root = tmp_path_factory.mktemp("dlmcli")
    return make_run_dir(root, "dlm", {
        "model": {"family": "diffusion_lm", "size": None, "d_model": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16,
                  "embed_dim": 16},
        "diffusion": {"sample_steps": 8, "timesteps": 200, "clamp_sampling": True},
        "data": {"source": "builtin", "seq_len": 32, "max_documents": 200, "cache_dir": str(root / "cache")},
        "train": {"max_steps": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 8,
                  "checkpoint_every": 8, "num_samples": 0, "eval_samples": 4},
        "scaling": {"deepspeed": False, "device": "cpu"},
    })


def cli(*args: str) -> Result:
    from orchestrator.cli import main

    return CliRunner().invoke(main, [*args], catch_exceptions=False)


def test_cli_denoise_prints_cosine_and_accuracy(run_dir: Path) -> None:
    res = cli("denoise", str(run_dir), "--text", "The capital of India is New Delhi.", "--t", "0.1,0.9")
    assert res.exit_code == 0, res.output
    assert "reconstruction one-shot: x0_hat" in res.output
    assert "corrupted      the noisy embeddings x_t rounded to their nearest tokens" in res.output
    accs = [float(a) for a in re.findall(r"token accuracy ([\d.]+)", res.output)]
    cosines = [float(c) for c in re.findall(r"cosine (-?[\d.]+)", res.output)]
    assert len(accs) == 2 and len(cosines) == 2 and all(-1 <= c <= 1 for c in cosines), res.output
    assert res.output.count("  corrupted     ") == 2 and res.output.count("  reconstructed ") == 2
    assert "no token view" not in res.output
    sampled = cli("denoise", str(run_dir), "--text", "abc def", "--t", "0.5", "--steps", "3")
    assert sampled.exit_code == 0 and "ancestral_clamp sampler from step" in sampled.output, sampled.output


def test_cli_sample_infill_prompt(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    res = cli("sample", str(run_dir), "--prompt", "The [MASK:3] is", "--num", "2", "--steps", "5",
              "--out", str(out), "--temperature", "0.5")
    assert res.exit_code == 0, res.output
    assert "sampler     ancestral_clamp: 2 x 11 tokens, 5 steps" in res.output  # the run clamps: default
    assert "(infill: 3 of 11 tokens generated)" in res.output  # BOS + "The " + 3 + " is"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        ids = row["token_ids"]
        assert len(ids) == 11 and bytes(ids[1:5]) == b"The " and bytes(ids[8:]) == b" is"
    again = tmp_path / "again.jsonl"
    cli("sample", str(run_dir), "--prompt", "The [MASK:3] is", "--num", "2", "--steps", "5", "--out", str(again),
        "--temperature", "0.5")
    assert [json.loads(x)["token_ids"] for x in again.read_text().splitlines()] == [r["token_ids"] for r in rows]
    res = cli("sample", str(run_dir), "--sampler", "ancestral", "--num", "1", "--steps", "3", "--prompt", "The")
    assert res.exit_code == 0 and "[0] The" in res.output, res.output
    bad = cli("sample", str(run_dir), "--top-p", "0.9")
    assert bad.exit_code == 2 and "top-p does not apply" in bad.output and "Traceback" not in bad.output


def test_cli_eval_reproduces_val_nll_and_k_draws(run_dir: Path) -> None:
    res = cli("eval", str(run_dir), "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    from tests.helpers import CKPT_NAME

    trained_val = json.loads((run_dir / CKPT_NAME / "trainer_state.json").read_text())["val"]["val/nll"]
    assert abs(got["nll"] - trained_val) <= 1e-9 * max(1.0, abs(trained_val))
    assert "(reproduced, to float rounding)" in res.output
    k = cli("eval", str(run_dir), "--samples", "2", "--json")
    assert k.exit_code == 0, k.output
    got_k = json.loads(k.stdout)
    assert got_k["nll_se"] > 0 and math.isfinite(got_k["nll"])
