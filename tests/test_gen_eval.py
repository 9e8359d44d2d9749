"""Gen-PPL, entropy, judges (difflm ar and a tiny local Hugging Face causal LM), float32 vs float64 draws,
and the lm-eval adapter's maths: numbers against closed forms, in-process, tiny models."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from difflm.data.tokenization import ByteTokenizer
from difflm.families import build_model
from difflm.families.config import DiffusionConfig
from difflm.metrics.genppl import cut_at_eos, gen_ppl, judge_windows, ratio_mean_se, unigram_entropy
from difflm.metrics.loglik import TooLongError, continuation_logprob, rolling_windows
from difflm.models.config import ModelConfig
from difflm.sampling.core import draw_precision, sample_categorical
from orchestrator.errors import SpecError
from orchestrator.eval.judge import DifflmJudge, HFJudge, load_judge
from tests.helpers import randomize_zero_init

TOK = ByteTokenizer()
V = TOK.vocab_size


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, size=None, d_model=32, n_layers=1, n_heads=2, cond_dim=16)
    return build_model(cfg, DiffusionConfig(), V, bos_id=TOK.bos_id, eos_id=TOK.eos_id, pad_id=TOK.pad_id).eval()


def unigram_judge(logp: torch.Tensor, context: int) -> DifflmJudge:
    """An ar judge whose next-token distribution is ``logp`` whatever the context: output weight 0, bias logp."""
    model = tiny("ar")
    with torch.no_grad():
        model.backbone.final.linear.weight.zero_()
        model.backbone.final.linear.bias.copy_(logp)
    ckpt = SimpleNamespace(model=model, tokenizer=TOK, device=torch.device("cpu"), path=Path("/nonexistent"),
                           spec=SimpleNamespace(data=SimpleNamespace(seq_len=context)))
    return DifflmJudge(ckpt=ckpt)


# ---- pure maths -------------------------------------------------------------------------------------


def test_unigram_entropy_of_known_sequences() -> None:
    assert unigram_entropy([5, 5, 7, 7]) == pytest.approx(math.log(2), abs=1e-12)
    assert unigram_entropy([1, 2, 3, 3]) == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)), abs=1e-12)
    assert unigram_entropy([4] * 9) == 0.0 and unigram_entropy([]) == 0.0
    assert unigram_entropy(list(range(64))) == pytest.approx(math.log(64), abs=1e-12)


def test_cut_at_eos_and_ratio_se() -> None:
    assert cut_at_eos([TOK.bos_id, 1, 2, TOK.eos_id, 3], TOK.eos_id, TOK.bos_id) == [1, 2]
    assert cut_at_eos([1, 2], TOK.eos_id, TOK.bos_id) == [1, 2]
    r, se = ratio_mean_se([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])  # every pair has ratio 2: no spread
    assert r == 2.0 and se == pytest.approx(0.0, abs=1e-12)


def test_judge_windows_score_every_token_once() -> None:
    for n in (1, 2, 7, 8, 9, 30, 64):
        wins = judge_windows(n, 8)
        scored = [i for _, end, first in wins for i in range(first, end)]
        assert scored == list(range(1, n)), n
        assert all(end - start <= 8 and start < first for start, end, first in wins)


# ---- judges: closed form ----------------------------------------------------------------------------


def test_gen_ppl_equals_closed_form_with_windows() -> None:
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(V, generator=g).mul(2).log_softmax(-1)
    judge = unigram_judge(logp, context=8)  # samples are longer than the context: windows, not truncation
    samples = [[int(i) for i in torch.randint(0, 256, (n,), generator=g)] for n in (5, 23, 40)]
    texts = [TOK.decode(s) for s in samples]
    sums, counts = judge.score(texts, samples)
    assert counts == [len(s) for s in samples]  # BOS + n tokens: n targets, every one scored
    for s, total in zip(samples, sums):
        assert total == pytest.approx(-float(logp[s].double().sum()), rel=1e-5)
    res = gen_ppl(sums, counts, samples)
    closed = math.exp(-sum(float(logp[s].double().sum()) for s in samples) / sum(map(len, samples)))
    assert res.ppl == pytest.approx(closed, rel=1e-5)
    assert res.entropy == pytest.approx(sum(unigram_entropy(s) for s in samples) / 3, abs=1e-12)
    uniform = unigram_judge(torch.full((V,), -math.log(V)), context=8)
    assert gen_ppl(*uniform.score(texts, samples), samples).ppl == pytest.approx(V, rel=1e-5)


@pytest.fixture(scope="module")
def hf_judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a word-level tokenizer, saved locally (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hfjudge")
    vocab = {w: i for i, w in enumerate(["<bos>", "<eos>", "<unk>", *"the a cat dog sat on mat and ran".split()])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=6, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=1))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_hf_judge_windows_match_direct_scoring(hf_judge_dir: Path) -> None:
    judge = load_judge(str(hf_judge_dir), torch.device("cpu"))
    assert isinstance(judge, HFJudge) and judge.context == 6
    short, long = "the cat sat", "the cat sat on the mat and the dog ran on the mat"
    sums, counts = judge.score([short, long])
    assert counts == [3, 13]  # BOS + words: every word scored, the long one in windows of 6
    ids = torch.tensor([[0, *judge.tokenizer(short, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        logp = judge.model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    assert sums[0] == pytest.approx(-float(logp.gather(-1, ids[0, 1:, None]).sum()), rel=1e-6)
    assert judge.features([short, long]).shape == (2, 16)


class _HFStyle(torch.nn.Module):
    """A difflm ar network seen the way a Hugging Face causal LM is called (.logits, .hidden_states)."""

    def __init__(self, ar: torch.nn.Module) -> None:
        super().__init__()
        self.ar = ar

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> SimpleNamespace:
        logits, hidden = self.ar.backbone(input_ids, None, return_hidden=True)
        return SimpleNamespace(logits=logits, hidden_states=(hidden,))


class _HFStyleTokenizer:
    """The byte tokenizer behind a Hugging Face tokenizer's call convention."""

    bos_token_id = TOK.bos_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": TOK.encode(text)}


def test_ar_judge_and_the_same_model_as_hf_give_the_same_gen_ppl() -> None:
    """One scoring path: a difflm ar judge and the same network behind the Hugging Face interface agree on
    every per-sample NLL sum (re-tokenised texts, windows), hence on gen-PPL, and on the MAUVE features;
    and both equal a direct full-context computation for a sample that fits one window."""
    from orchestrator.eval.judge import CausalJudge

    model = tiny("ar", seed=3)
    randomize_zero_init(model, seed=3)
    ar = DifflmJudge(ckpt=SimpleNamespace(model=model, tokenizer=TOK, device=torch.device("cpu"),
                                          path=Path("/nonexistent"), spec=SimpleNamespace(data=SimpleNamespace(seq_len=16))))
    hf = HFJudge(model=_HFStyle(model), tokenizer=_HFStyleTokenizer(), context=16)
    assert isinstance(ar, CausalJudge) and isinstance(hf, CausalJudge)
    texts = ["The cat sat.", "A longer sample that needs three windows of sixteen bytes each, or more."]
    samples = [TOK.encode(t) for t in texts]
    a_sums, a_counts = ar.score(texts)  # re-tokenised from the text
    h_sums, h_counts = hf.score(texts)
    assert a_counts == h_counts == [len(s) for s in samples]
    assert a_sums == h_sums  # the same code on the same numbers: bit-identical, not approximately
    assert gen_ppl(a_sums, a_counts, samples).ppl == gen_ppl(h_sums, h_counts, samples).ppl
    ids = torch.tensor([[TOK.bos_id, *samples[0]]])
    with torch.no_grad():
        logp = model.backbone(ids)[0, :-1].double().log_softmax(-1)
    assert a_sums[0] == pytest.approx(-float(logp.gather(-1, ids[0, 1:, None]).sum()), rel=1e-9)
    assert ar.score(texts, samples) == (a_sums, a_counts)  # given ids = re-tokenised text with the same tokenizer
    fa, fh = ar.features(texts), hf.features(texts)
    assert fa.shape == (2, 32) and torch.equal(fa, fh) and not torch.equal(fa[0], fa[1])


def test_bad_judges_raise_with_the_reason(hf_judge_dir: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    with pytest.raises(SpecError, match="does not exist"):
        load_judge(str(tmp_path / "missing"), torch.device("cpu"))
    BertModel(BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(SpecError, match="not a causal LM"):
        load_judge(str(tmp_path / "bert"), torch.device("cpu"))


# ---- float64 vs float32 draws -----------------------------------------------------------------------


def test_float32_draws_truncate_the_gumbel_tail() -> None:
    """The documented direction, exactly: float32 uniforms lie on a 2^-24 grid, so the Gumbel noise lies in
    [-2.81, 16.64] and an id 19.5 nats below the top is never drawn (float64: probability e^-19.5 per id, and
    its noise range is [-3.6, 36.7]). Fewer reachable ids = lower entropy of the draws."""
    logp = torch.tensor([[0.0, -19.5]]).expand(1 << 16, -1)
    g = torch.Generator().manual_seed(0)
    with draw_precision("float32"):
        assert int(sample_categorical(logp, g).sum()) == 0
    # the noise itself: float32's extreme uniforms give a Gumbel maximum near 16.6, float64's far beyond it
    u32 = torch.tensor([1 - 2**-24], dtype=torch.float32)
    assert float(-torch.log(-torch.log(u32))) == pytest.approx(16.64, abs=0.01)
    u64 = torch.tensor([1 - 2**-53], dtype=torch.float64)
    assert float(-torch.log(-torch.log(u64))) > 36.0


def test_sample_dtype_reaches_every_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """SampleOptions.sample_dtype is what the family's draws use (mdlm ddpm, ar ancestral), via get_sampler."""
    import difflm.sampling.core as core
    from difflm.sampling import SampleOptions, get_sampler

    seen: list[torch.dtype] = []
    real = core.sample_categorical

    def spy(log_probs: torch.Tensor, generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        seen.append(torch.float64 if core._DRAW_DTYPE.get() == "float64" else torch.float32)
        return real(log_probs, generator, dtype)

    monkeypatch.setattr(core, "sample_categorical", spy)
    for family, sampler in (("mdlm", "ddpm"), ("ar", "ancestral")):
        model = tiny(family)
        for dtype in ("float32", "float64"):
            seen.clear()
            fn = get_sampler(model, sampler)
            fn(SampleOptions(num=2, length=8, steps=4, sample_dtype=dtype), torch.Generator().manual_seed(0))  # type: ignore[arg-type]
            assert seen and set(seen) == {getattr(torch, dtype)}, (family, dtype, seen)


# ---- lm-eval adapter maths --------------------------------------------------------------------------


def test_ar_continuation_logprob_is_the_exact_sum() -> None:
    model = tiny("ar")
    randomize_zero_init(model)
    ctx, cont = TOK.encode("The cat "), TOK.encode("sat down")
    score = continuation_logprob(model, ctx, cont, bos_id=TOK.bos_id, max_len=32, samples=4)
    ids = torch.tensor([[TOK.bos_id, *ctx, *cont]])
    with torch.no_grad():
        logp = model.backbone(ids)[0, :-1].double().log_softmax(-1)
    exact = float(logp.gather(-1, ids[0, 1:, None])[len(ctx):].sum())
    assert score.logprob == pytest.approx(exact, abs=1e-4) and score.se == 0.0


def test_mdlm_continuation_bound_within_3_se_of_high_k() -> None:
    model = tiny("mdlm")
    randomize_zero_init(model)
    ctx, cont = TOK.encode("The cat "), TOK.encode("sat down")
    low = continuation_logprob(model, ctx, cont, bos_id=TOK.bos_id, max_len=32, samples=16, seed=1)
    high = continuation_logprob(model, ctx, cont, bos_id=TOK.bos_id, max_len=32, samples=1024, seed=2)
    assert low.se > 0 and high.se < low.se / 2  # 64x the draws; heavy tails at low masking rates
    assert abs(low.logprob - high.logprob) <= 3 * math.hypot(low.se, high.se), (low, high)
    assert high.logprob < 0


def test_request_longer_than_seq_len_names_the_lengths() -> None:
    model = tiny("mdlm")
    with pytest.raises(TooLongError, match=r"request of 41 tokens .*30 context \+ 10 continuation.*seq_len 32"):
        continuation_logprob(model, [65] * 30, [66] * 10, bos_id=TOK.bos_id, max_len=32, samples=2)


def test_rolling_windows_cover_every_token_once() -> None:
    for n in (1, 5, 31, 32, 100):
        wins = rolling_windows(n, 32)
        assert [i for _, first, end in wins for i in range(first, end)] == list(range(n))
        assert all(end - start + 1 <= 32 for start, _, end in wins)


# ---- `difflm results`: gen-PPL / entropy columns -----------------------------------------------------


def test_results_table_shows_gen_ppl_and_entropy_of_evaluated_trials(tmp_path: Path) -> None:
    """Hand-made trial folders (no Ray): two seeds of one configuration evaluated at T=32, 128 (and 1000 for one
    seed), one configuration at T=32 and 128, one not evaluated. The table compares at the largest T every
    evaluated trial has (128), averages the
    seeds (SE = sqrt(sum SE^2) / n) and shows '-' where no eval ran; results.json carries the numbers."""
    import json

    from orchestrator.sweep.results import ConfigResult, attach_sample_quality, markdown_table, write_tables

    def evaluated(trial: str, points: list[tuple[int, float, float, float, float]], dtype: str = "float64") -> None:
        folder = tmp_path / trial / "train" / "eval"  # where `difflm eval TRIAL/train --gen-ppl` writes
        folder.mkdir(parents=True)
        rows = [{"steps": t, "gen_ppl": p, "gen_ppl_se": pse, "entropy": e, "entropy_se": ese} for t, p, pse, e, ese in points]
        (folder / "sample_quality.json").write_text(json.dumps({"judge": "difflm ar run J", "sample_dtype": dtype,
                                                                "gen_ppl": rows}))

    evaluated("a1", [(32, 90.0, 9.0, 4.0, 0.1), (128, 60.0, 3.0, 4.2, 0.3)])
    evaluated("a2", [(32, 80.0, 8.0, 4.1, 0.1), (128, 40.0, 4.0, 4.4, 0.4), (1000, 30.0, 3.0, 4.0, 0.4)])
    evaluated("b1", [(32, 150.0, 15.0, 5.5, 0.2), (128, 120.0, 12.0, 5.0, 0.2)])

    def config(key: str, trials: list[str], rank: int) -> ConfigResult:
        return ConfigResult(config=key, params={"diffusion.schedule": key}, family="mdlm", trials=trials, seeds=[None],
                            n_seeds=len(trials), step=30, val_nll_mean=2.0 + rank, val_nll_se=0.01, seed_sd=None,
                            per_seed=[None], rank=rank, overall_rank=rank, is_best=rank == 1, diff_to_best=None,
                            diff_se=None, diff_at_step=None, paired=False, seeds_paired=0, tied=False, why_tied="",
                            full_budget=True, stopped_early=False, steps=30, status="TERMINATED", wall_time_s=1.0,
                            error=None, best_checkpoint=None, trial_dir=str(tmp_path / trials[0]))

    configs = [config("loglinear", ["a1", "a2"], 1), config("linear", ["b1"], 2), config("cosine", ["c1"], 3)]
    trials = {k: SimpleNamespace(trial_dir=str(tmp_path / k), best_checkpoint=None) for k in ("a1", "a2", "b1", "c1")}
    notes = attach_sample_quality(configs, trials)  # type: ignore[arg-type]
    a, b, c = configs
    assert (a.gen_steps, a.gen_trials, b.gen_steps, c.gen_ppl) == (128, 2, 128, None)
    assert a.gen_ppl == pytest.approx(50.0) and a.gen_ppl_se == pytest.approx(math.sqrt(3.0**2 + 4.0**2) / 2)
    assert a.entropy == pytest.approx(4.3) and a.entropy_se == pytest.approx(0.25)
    assert (b.gen_ppl, b.gen_ppl_se, b.entropy) == (120.0, 12.0, 5.0)
    assert notes == ["gen-PPL / entropy: T=128 steps, float64 draws, judge difflm ar run J (`difflm eval TRIAL/train "
                     "--gen-ppl`); ± SE over samples, mean over seeds"]
    md = markdown_table({"sweep": {"search": {"diffusion.schedule": {}}, "metric": "val/nll"}}, configs).splitlines()
    head = [h.strip() for h in md[0].strip("|").split("|")]
    assert head[head.index("tied") + 1: head.index("tied") + 3] == ["gen-PPL ± SE", "entropy ± SE"]
    cells = [[x.strip() for x in line.strip("|").split("|")] for line in md[2:]]
    at = head.index("gen-PPL ± SE")
    assert [r[at:at + 2] for r in cells] == [["50.00 ± 2.50", "4.300 ± 0.250"], ["120.00 ± 12.00", "5.000 ± 0.200"],
                                             ["-", "-"]]
    write_tables(tmp_path, {"sweep": {"search": {"diffusion.schedule": {}}}}, configs)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["gen_ppl"] for r in saved] == [50.0, 120.0, None] and saved[1]["entropy_se"] == 0.2
    evaluated("c1", [(64, 70.0, 7.0, 3.0, 0.1)], dtype="float32")  # no common T any more, and another precision
    notes = attach_sample_quality(configs, trials)  # type: ignore[arg-type]
    assert (a.gen_steps, a.gen_ppl, b.gen_steps, c.gen_steps, c.gen_ppl) == (128, 50.0, 128, 64, 70.0)  # seeds share T
    assert any("float32 and float64" in n for n in notes) and any("T = 64, 128" in n for n in notes)
    plain = markdown_table({"sweep": {"search": {"diffusion.schedule": {}}, "metric": "val/nll"}},
                           [config("x", ["none"], 1)])
    assert "gen-PPL" not in plain  # runs without evals: the table is unchanged


# ---- MAUVE ------------------------------------------------------------------------------------------


def test_mauve_is_one_for_the_same_distribution_and_low_for_a_different_one() -> None:
    """mauve_score on fixed features (no feature model): a set against itself scores 1, against fresh draws
    of the same distribution near 1, against a clearly shifted distribution far lower; MAUVE falls as the
    shift grows. The settings returned are those documented (buckets = max(2, n / 10), seed 25)."""
    pytest.importorskip("mauve")
    from orchestrator.eval.mauve import mauve_score

    rng = np.random.default_rng(0)
    n, d = 120, 16
    centers = rng.normal(size=(4, d)) * 3  # a 4-cluster mixture, as text embeddings cluster by topic

    def draw(shift: float) -> np.ndarray:
        x = centers[rng.integers(0, 4, n)] + rng.normal(size=(n, d))
        x[:, 0] += shift
        return x.astype(np.float32)

    p = draw(0.0)
    same, settings = mauve_score(p, p)
    fresh, _ = mauve_score(p, draw(0.0))
    near, _ = mauve_score(p, draw(3.0))
    far, _ = mauve_score(p, draw(12.0))
    assert same == pytest.approx(1.0, abs=1e-6)
    assert fresh > 0.9 and far < 0.2 and fresh > near > far, (fresh, near, far)
    assert settings["num_buckets"] == 12 and settings["seed"] == 25 and settings["p"] == settings["q"] == n


def test_eval_results_go_to_the_run_folder_for_both_checkpoint_layouts(tmp_path: Path) -> None:
    """`difflm train` keeps RUN/checkpoint_N (last) and the best as RUN/checkpoints/best-checkpoint_N; a run dir
    resolves to the latter. Both must write RUN/eval (where `difflm results` and `difflm export` read)."""
    from orchestrator.eval.genppl import eval_dir

    run = tmp_path / "run"
    (run / "checkpoints" / "best-checkpoint_00000300").mkdir(parents=True)
    (run / "checkpoint_00000300").mkdir()
    assert eval_dir(run / "checkpoints" / "best-checkpoint_00000300") == run / "eval"
    assert eval_dir(run / "checkpoint_00000300") == run / "eval"
    assert eval_dir(tmp_path / "exported") == tmp_path / "exported" / "eval"  # a folder outside a run
