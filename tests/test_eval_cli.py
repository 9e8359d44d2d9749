"""`difflm sample|eval|denoise` through click on checkpoints made in-process (no Ray, tiny models)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from difflm.data import prepare_data
from orchestrator.rundir.checkpoints import resolve_checkpoint
from orchestrator.cli import main
from orchestrator.train.engine import TorchEngine
from orchestrator.errors import SpecError
from orchestrator.train.runner import Runner, WorkerContext
from tests.helpers import CKPT_NAME, CPU, make_run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Run dirs laid out like `difflm train` leaves them (checkpoints/{best,last} -> checkpoint_*), mdlm and ar."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: avoid oversubscribing shared CPUs (speed only)
    root = tmp_path_factory.mktemp("evalcli")
    out: dict[str, Path] = {}
    for family in ("mdlm", "ar"):
        out[family] = make_run_dir(root, family, {
            "model": {"family": family, "size": None, "d_model": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16},
            "diffusion": {"sample_steps": 8} if family != "ar" else {},  # ar reads no diffusion field
            "data": {"source": "builtin", "seq_len": 32, "max_documents": 200, "cache_dir": str(root / "cache")},
            "train": {"max_steps": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 8,
                      "checkpoint_every": 8, "num_samples": 0, "eval_samples": 4},
            "scaling": {"deepspeed": False, "device": "cpu"},
        })
    yield out
    torch.set_num_threads(before)


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, [*args], catch_exceptions=False)


def trained_val_nll(run_dir: Path) -> float:
    return json.loads((run_dir / CKPT_NAME / "trainer_state.json").read_text())["val"]["val/nll"]


# ---- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_references(runs: dict[str, Path]) -> None:
    run, ckpt = runs["mdlm"], (runs["mdlm"] / CKPT_NAME).resolve()
    for ref in (run, run / "best", run / "last", run / "checkpoints" / "last", run / CKPT_NAME):
        assert resolve_checkpoint(ref) == ckpt, ref
    with pytest.raises(SpecError) as err:
        resolve_checkpoint(run / "nope")
    assert "does not exist" in str(err.value) and "tried:" in str(err.value)


def test_bad_checkpoint_path_exits_2(runs: dict[str, Path], tmp_path: Path) -> None:
    for cmd in (["sample"], ["eval"], ["denoise", "--text", "hi"]):
        res = cli(cmd[0], str(tmp_path / "missing"), *cmd[1:])
        assert res.exit_code == 2, res.output
        assert "error: no checkpoint found" in res.output and "tried:" in res.output
        assert "Traceback" not in res.output


# ---- sample --------------------------------------------------------------------------------------


def test_sample_prints_samples_throughput_and_writes_jsonl(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    res = cli("sample", str(runs["mdlm"]), "--num", "3", "--steps", "20", "--seed", "1", "--out", str(out),
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "sampler     ddpm_cache: 3 x 32 tokens, 20 steps" in res.output
    assert all(f"[{i}] " in res.output for i in range(3))
    rate = re.search(r"96 new tokens in [\d.]+ s = ([\d,]+) tokens/s \((\d+) network calls = NFE, ([\d.]+) NFE per token\)", res.output)
    assert rate and float(rate.group(1).replace(",", "")) > 0 and 1 <= int(rate.group(2)) <= 21, res.output
    assert float(rate.group(3)) == round(int(rate.group(2)) / 32, 3), res.output  # calls of the whole batch / tokens per row
    assert "diagnostics (samples): distinct-1/2/3" in res.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and [r["index"] for r in lines] == [0, 1, 2]
    first = lines[0]
    assert (first["sampler"], first["steps"], first["seed"], first["num"], first["length"]) == ("ddpm_cache", 20, 1, 3, 32)
    assert len(first["token_ids"]) == 32 and first["tokens_per_s"] > 0 and "distinct_1" in first["diagnostics"]
    # same seed, same samples; the uncached sampler gives the same tokens too
    again = tmp_path / "again.jsonl"
    cli("sample", str(runs["mdlm"]), "--num", "3", "--steps", "20", "--seed", "1", "--out", str(again),
        "--sampler", "ddpm")
    assert [r["token_ids"] for r in map(json.loads, again.read_text().splitlines())] == [r["token_ids"] for r in lines]
    other = tmp_path / "other.jsonl"
    cli("sample", str(runs["mdlm"]), "--num", "3", "--steps", "20", "--seed", "2", "--out", str(other))
    assert [r["token_ids"] for r in map(json.loads, other.read_text().splitlines())] != [r["token_ids"] for r in lines]


def test_sample_infill_prefix_and_semi_ar(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "infill.jsonl"
    res = cli("sample", str(runs["mdlm"]), "--prompt", "The [MASK:4] is", "--num", "2", "--steps", "8",
              "--out", str(out), "--temperature", "0.8", "--top-p", "0.9")
    assert res.exit_code == 0, res.output
    assert "(infill: 4 of 12 tokens generated)" in res.output  # BOS + "The " + 4 + " is"
    for row in map(json.loads, out.read_text().splitlines()):
        ids = row["token_ids"]
        assert len(ids) == 12 and bytes(ids[1:5]) == b"The " and bytes(ids[9:]) == b" is"
    res = cli("sample", str(runs["mdlm"]), "--prompt", "The", "--num", "1", "--steps", "4", "--remasking",
              "low_confidence")
    assert res.exit_code == 0 and "(prefix: 28 of 32 tokens generated)" in res.output, res.output
    res = cli("sample", str(runs["mdlm"]), "--length", "80", "--block", "16", "--num", "1", "--steps", "4",
              "--out", str(tmp_path / "long.jsonl"))
    assert res.exit_code == 0, res.output
    assert "note: semi-autoregressive: 80 tokens in 4 windows of 32 (stride 16)" in res.output
    assert len(json.loads((tmp_path / "long.jsonl").read_text())["token_ids"]) == 80
    res = cli("sample", str(runs["ar"]), "--prompt", "The", "--num", "2", "--sampler", "ancestral")
    assert res.exit_code == 0 and "[1] The" in res.output, res.output


def test_sample_bad_input_exits_2(runs: dict[str, Path]) -> None:
    cases = [
        (["sample", str(runs["mdlm"]), "--sampler", "nope"], "choose one of ddpm_cache, ddpm, analytic"),
        (["sample", str(runs["ar"]), "--prompt", "a [MASK:2] b"], "only continue a prefix prompt"),
        (["sample", str(runs["mdlm"]), "--prompt", "a [MASK:two]"], "malformed mask span"),
        (["sample", str(runs["mdlm"]), "--sampler", "analytic", "--remasking", "low_confidence"], "not analytic"),
        # fast-decoding options where they do not apply name where they do (issue 25)
        (["sample", str(runs["mdlm"]), "--sampler", "analytic", "--cache", "dual", "--block-length", "16"],
         "work with the ddpm and ddpm_cache samplers, not analytic"),
        (["sample", str(runs["ar"]), "--cache", "prefix", "--block-length", "16"],
         "they apply to the ddpm and ddpm_cache samplers of mdlm and bijective and to bd3lm"),
        (["sample", str(runs["ar"]), "--remasking", "threshold"],
         "threshold apply to the masked families: mdlm and bijective (samplers ddpm, ddpm_cache) and bd3lm"),
    ]
    for args, message in cases:
        res = cli(*args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and "Traceback" not in res.output, res.output


# ---- eval ----------------------------------------------------------------------------------------


def test_eval_reproduces_training_val_nll(runs: dict[str, Path]) -> None:
    for family in ("mdlm", "ar"):
        res = cli("eval", str(runs[family]), "--json")
        assert res.exit_code == 0, res.output
        got = json.loads(res.stdout)
        assert abs(got["nll"] - trained_val_nll(runs[family])) <= 1e-9, (family, got)
        assert "(reproduced, to float rounding)" in res.output
        # the batch size changes speed only: every sequence's noise is its own
        other = json.loads(cli("eval", str(runs[family]), "--json", "--batch-size", "3").stdout)
        assert abs(other["nll"] - got["nll"]) <= 1e-6 and other["nll_se"] == pytest.approx(got["nll_se"], rel=1e-5)
        assert got["bits_per_token"] == pytest.approx(got["nll"] / math.log(2))
    assert "NLL bound" in cli("eval", str(runs["mdlm"])).output
    assert "NLL (exact)" in cli("eval", str(runs["ar"])).output


def test_eval_k_draws_within_standard_error(runs: dict[str, Path]) -> None:
    res = cli("eval", str(runs["mdlm"] / "last"), "--samples", "16", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    se, se1 = got["nll_se"], got["nll_se_one_draw"]
    assert 0 < se < se1 and se1 == pytest.approx(4 * se)  # K = 16 draws: a quarter of the one-draw error
    # training's val/nll took 4 draws per sequence: compare with both errors combined
    train_se = json.loads((runs["mdlm"] / CKPT_NAME / "trainer_state.json").read_text())["val"]["val/nll_se"]
    assert abs(got["difference"]) <= 3 * math.hypot(se, train_se), got
    assert "combined standard errors" in res.output
    assert re.search(r"NLL bound   [\d.]+ ± [\d.]+ nats/token", res.output)
    ar = cli("eval", str(runs["ar"]), "--samples", "2")
    assert "none: the NLL is exact" in ar.output


def test_eval_other_text_file(runs: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    paragraphs = [f"Paragraph {i} says something about namespaces and functions." for i in range(12)]
    text.write_text("\n\n".join(paragraphs))
    res = cli("eval", str(runs["mdlm"]), "--data", str(text), "--json")  # a file given to eval is scored whole
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    # byte tokens, one EOS per paragraph, packed into BOS + 30 + EOS blocks
    assert got["blocks"] == sum(len(p) + 1 for p in paragraphs) // 30
    assert "all 12 documents" in got["data"] and "training_val_nll" not in got and got["nll"] > 0
    explicit = json.loads(cli("eval", str(runs["mdlm"]), "--data", str(text), "--split", "all", "--json").stdout)
    assert explicit["nll"] == got["nll"] and explicit["blocks"] == got["blocks"]
    val = cli("eval", str(runs["mdlm"]), "--data", str(text), "--split", "train", "--json")  # mimics training's split
    assert val.exit_code == 0 and "train split" in json.loads(val.stdout)["data"]
    assert json.loads(val.stdout)["blocks"] < got["blocks"]
    res = cli("eval", str(runs["mdlm"]), "--data", str(tmp_path / "nothing.txt"))
    assert res.exit_code == 2 and "error:" in res.output, res.output


# ---- denoise -------------------------------------------------------------------------------------


def test_denoise_prints_corruption_reconstruction_and_accuracy(runs: dict[str, Path]) -> None:
    res = cli("denoise", str(runs["mdlm"]), "--text", "The function returns a value.", "--t", "0.2,0.8")
    assert res.exit_code == 0, res.output
    assert "reconstruction one-shot: argmax" in res.output
    accs = [float(a) for a in re.findall(r"token accuracy ([\d.]+)", res.output)]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    assert res.output.count("original      The function returns a value.") == 2
    assert res.output.count("  corrupted     ") == 2 and res.output.count("  reconstructed ") == 2
    masked = [int(n) for n in re.findall(r"corrupted (\d+)/29 tokens", res.output)]
    assert len(masked) == 2 and masked[0] <= masked[1]  # one seed: the corruptions are nested
    sampled = cli("denoise", str(runs["mdlm"]), "--text", "abc def", "--t", "0.5", "--steps", "4")
    assert sampled.exit_code == 0 and "ddpm sampler from t=0.5" in sampled.output, sampled.output


def test_denoise_bad_input_exits_2(runs: dict[str, Path]) -> None:
    res = cli("denoise", str(runs["ar"]), "--text", "hello")
    assert res.exit_code == 2 and "no noise process" in res.output, res.output
    res = cli("denoise", str(runs["mdlm"]), "--text", "hello", "--t", "0.5,2")
    assert res.exit_code == 2 and "must be in [0, 1]" in res.output, res.output


def test_eval_reproduces_multi_worker_validation(runs: dict[str, Path], tmp_path: Path) -> None:
    """A 2-worker run validated each worker's shard with the per-sequence noise; eval (one process, no
    emulation of shards) gets the same per-sequence draws and so the same val/nll."""
    import shutil

    import numpy as np
    import yaml

    from difflm.evaluation import ValDraws, load_val_draws
    from orchestrator.rundir.checkpoints import load_checkpoint

    ckpt_dir = tmp_path / "two-workers"
    shutil.copytree(runs["mdlm"] / CKPT_NAME, ckpt_dir)
    raw = yaml.safe_load((ckpt_dir / "spec.yaml").read_text())
    raw["scaling"]["num_workers"] = 2
    (ckpt_dir / "spec.yaml").write_text(yaml.safe_dump(raw))
    loaded = load_checkpoint(ckpt_dir, "cpu")
    data = prepare_data(loaded.spec.data, loaded.spec.tokenizer, log=lambda _: None)
    engine = TorchEngine(loaded.model, loaded.spec.train, CPU)
    shards = []
    for rank in (0, 1):  # no process group: each rank's validate() keeps its own shard's draws
        runner = Runner(loaded.spec, data, engine, WorkerContext(rank, 2, CPU))
        runner.validate()
        assert runner.last_draws is not None
        shards.append(runner.last_draws)
    both = ValDraws.concat(shards)
    assert both.indices.tolist() == list(range(len(data.val)))  # the shards tile the split in index order
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    state["val"]["val/nll"] = both.nll
    (ckpt_dir / "trainer_state.json").write_text(json.dumps(state))
    saved = tmp_path / "draws.npz"
    res = cli("eval", str(ckpt_dir), "--json", "--save", str(saved))
    assert res.exit_code == 0, res.output
    assert "(reproduced, to float rounding)" in res.output, res.output
    assert abs(json.loads(res.stdout)["nll"] - both.nll) <= 1e-9
    assert abs(both.nll - trained_val_nll(runs["mdlm"])) <= 1e-9  # = the 1-worker run's val/nll
    np.testing.assert_allclose(load_val_draws(saved).sums, both.sums, rtol=1e-6)


# ---- gen-PPL, export, lm-eval ------------------------------------------------------------------------


def test_gen_ppl_frontier_with_an_ar_judge(runs: dict[str, Path], tmp_path: Path) -> None:
    png = tmp_path / "frontier.png"
    res = cli("eval", str(runs["mdlm"]), "--gen-ppl", "--judge", str(runs["ar"]), "--num", "4", "--steps", "2,8",
              "--plot", str(png), "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    rows = got["gen_ppl"]
    assert [r["steps"] for r in rows] == [2, 8] and got["sample_dtype"] == "float64"
    for r in rows:  # an 8-step tiny model: gen-PPL between 1 and the vocab, entropy <= log(30 tokens)
        assert 1 < r["gen_ppl"] < 259 and 0 < r["entropy"] <= math.log(31) and r["gen_ppl_se"] > 0
        assert r["judge_tokens"] == r["sample_tokens"]  # same tokenizer: every sample token scored once
    assert png.is_file() and png.stat().st_size > 1000
    assert "steps             gen-PPL" in res.output
    saved = json.loads((runs["mdlm"] / "eval" / "sample_quality.json").read_text())
    assert saved["gen_ppl"][0]["gen_ppl"] == rows[0]["gen_ppl"]
    for bad, why in ((str(tmp_path / "nope"), "does not exist"), (str(runs["mdlm"]), "not a causal LM")):
        res = cli("eval", str(runs["mdlm"]), "--gen-ppl", "--judge", bad, "--num", "2")
        assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
    res = cli("eval", str(runs["mdlm"]), "--gen-ppl", "--num", "2")
    assert res.exit_code == 2 and "--judge" in res.output


def test_mauve_with_an_ar_judge_prints_its_settings(runs: dict[str, Path], tmp_path: Path) -> None:
    """--mauve with a difflm ar judge (its final hidden states are the features): a score in (0, 1], the
    settings printed and saved; a missing reference file exits 2."""
    pytest.importorskip("mauve")
    ref = tmp_path / "held_out.txt"
    ref.write_text("= Heading =\n" + "\n".join(f"line {i} of the held out text has more than eight words" for i in range(8)))
    res = cli("eval", str(runs["mdlm"]), "--mauve", str(ref), "--judge", str(runs["ar"]), "--num", "8", "--steps", "2",
              "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["mauve"]
    assert 0 < got["score"] <= 1 and got["num_buckets"] == 2 and got["p"] == got["q"] == 8 and got["steps"] == 2
    assert f"MAUVE       {got['score']:.4f} (8 samples at T=2 vs 8 lines of {ref}; num_buckets 2" in res.output
    assert json.loads((runs["mdlm"] / "eval" / "mauve.json").read_text())["mauve"]["score"] == got["score"]
    res = cli("eval", str(runs["mdlm"]), "--mauve", str(tmp_path / "missing.txt"), "--judge", str(runs["ar"]), "--num", "2")
    assert res.exit_code == 2 and "no such file" in res.output, res.output


def test_export_round_trip_is_bit_identical(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "exported"
    res = cli("export", str(runs["mdlm"]), "--to", str(out))
    assert res.exit_code == 0, res.output
    assert {"model.safetensors", "spec.yaml", "tokenizer", "README.md", "trainer_state.json"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert f"{trained_val_nll(runs['mdlm']):.4f} ±" in card and "load_checkpoint" in card
    moved = tmp_path / "elsewhere"
    out.rename(moved)  # nothing points back into the run folder
    a = json.loads(cli("eval", str(runs["mdlm"]), "--json").stdout)
    b = json.loads(cli("eval", str(moved), "--json").stdout)
    assert a["nll"] == b["nll"] and a["nll_se"] == b["nll_se"]  # bit-identical
    assert cli("sample", str(moved), "--num", "1", "--steps", "2").exit_code == 0
    assert cli("export", str(runs["mdlm"]), "--to", str(moved)).exit_code == 2  # not empty: refuses


def test_lm_eval_adapter_on_a_local_task(runs: dict[str, Path], tmp_path: Path) -> None:
    from orchestrator.eval.lm_eval import DifflmHarnessModel

    req = lambda *args: type("Req", (), {"args": args})()  # noqa: E731
    ar = DifflmHarnessModel(run=str(runs["ar"]))
    [(lp, _)] = ar.loglikelihood([req("The ", "cat")])
    whole = ar.loglikelihood_rolling([req("The cat")])[0]
    first = ar.loglikelihood([req("", "The ")])[0][0]
    assert lp < 0 and whole == pytest.approx(first + lp, abs=1e-4)  # chain rule, exact for ar
    out = ar.generate_until([req("The ", {"until": ["e"], "max_gen_toks": 10})])[0]
    assert "e" not in out and len(out.encode()) <= 10
    lm_eval = pytest.importorskip("lm_eval")
    from orchestrator.eval.lm_eval import register

    cls = register()  # lm-eval's CLI passes its --device (default cuda:0, even without CUDA); model_args' wins
    on_default = cls.create_from_arg_string(f"run={runs['ar']}", {"device": "cuda:0", "batch_size": 1})
    assert on_default.ckpt.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cls.create_from_arg_string(f"run={runs['ar']},device=cpu", {"device": "cuda:0"}).ckpt.device.type == "cpu"
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"Item {i} is", "choices": [" red", " blue"], "gold": i % 2})
                              for i in range(4)))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model="difflm", model_args=f"run={runs['mdlm']},mc_samples=4",
                                      tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    acc = results["results"]["tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and results["results"]["tiny_mc"]["alias"] == "tiny_mc"
