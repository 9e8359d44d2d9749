"""`difflm sample`, `difflm eval` and `difflm denoise`: use a trained checkpoint in-process (no Ray).

    difflm sample runs/q --num 4 --steps 1000 --sampler ddpm_cache
    difflm sample runs/q --prompt "The capital of India is [MASK:5]."
    difflm sample runs/q --length 512 --block 64             # semi-autoregressive, longer than trained
    difflm eval runs/q --samples 16                          # the run's val split, 16 noise draws / sequence
    difflm eval runs/q/last --data notes.txt                 # all of notes.txt (--split val|train mimics training)
    difflm eval runs/q --gen-ppl --judge runs/ar --steps 32,128,1000   # samples scored by a judge
    difflm denoise runs/q --text "The capital of India is New Delhi." --t 0.1,0.5,0.9

Every command takes a run dir, RUN_DIR/best or RUN_DIR/last, or a checkpoint folder
(:mod:`orchestrator.rundir.checkpoints`). Bad input exits 2 with one line. Samplers, the NLL
bound and the denoising all come from the family (``Family.samplers``, ``forward`` /
``val_nll``, ``denoise``): nothing here branches on the family's name.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from orchestrator.cli.common import DENOISE_STEPS_HELP, DEVICES, user_errors

if TYPE_CHECKING:
    import numpy as np

    from difflm.data import Tokenizer
    from orchestrator.rundir.checkpoints import LoadedCheckpoint

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")


def _as_spec_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Sampling requests a family cannot honour are user errors too (SpecError -> exit 2)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from difflm.sampling import SamplingError
        from orchestrator.errors import SpecError

        try:
            return fn(*args, **kwargs)
        except (SamplingError, NotImplementedError) as exc:
            raise SpecError(str(exc)) from None

    return wrapper


def _load(checkpoint: str, device: str) -> LoadedCheckpoint:
    from orchestrator.rundir.checkpoints import load_checkpoint

    return load_checkpoint(checkpoint, device)


def _indent(text: str) -> str:
    return text.replace("\n", "\n    ")


# ================================================================================ sample


@click.command()
@click.argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
@click.option("--num", "-n", default=4, show_default=True, type=click.IntRange(1, 4096), help="Samples to draw (one batch).")
@click.option("--steps", type=click.IntRange(min=1), help=f"{DENOISE_STEPS_HELP}; default: the run's diffusion.sample_steps; per window when semi-autoregressive. ar ignores it.")
@click.option("--sampler", help="Sampler name (default: the family's first; mdlm: ddpm_cache; diffusion_lm: ancestral, or ancestral_clamp when the run set clamp_sampling). A wrong name lists the valid ones.")
@click.option("--length", type=click.IntRange(min=1), help="Tokens per sample (default: the trained length; for an infill prompt, the template's).")
@click.option("--block", type=click.IntRange(min=1), help="mdlm, longer than trained: new tokens per semi-autoregressive window (default: half the trained length).")
@click.option("--remasking", type=click.Choice(["random", "low_confidence", "threshold"]), default="random", show_default=True, help="Masked families (mdlm, bijective: ddpm/ddpm_cache; bd3lm): which masks a step reveals. random: ancestral; low_confidence: the scheduled number, most confident first (LLaDA); threshold: every mask whose drawn token's probability exceeds --threshold, at least one per row (Fast-dLLM; --steps unused).")
@click.option("--threshold", default=0.9, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True), help="--remasking threshold: confidence a mask must exceed to be revealed in parallel (1 = one per step).")
@click.option("--block-length", type=click.IntRange(min=1), help="mdlm, bijective: decode the sample in blocks of this many positions, left to right (LLaDA/Fast-dLLM semi-AR); --steps is then per block. bd3lm always decodes in its trained blocks (--steps per block too).")
@click.option("--cache", type=click.Choice(["none", "prefix", "dual"]), default="none", show_default=True, help="mdlm, bijective: Fast-dLLM KV cache in block decoding (use with --block-length): prefix reuses the keys/values before the block, dual also after it, refreshed once per block (approximate). bd3lm's exact cache is always on (sampler ddpm_uncached turns it off).")
@click.option("--prompt", help="Prefix to continue, or text with [MASK:n] spans to infill, e.g. 'The capital of India is [MASK:5].'")
@click.option("--seed", default=0, show_default=True, help="Seed of the sampler's generator: same seed, same samples (on one device).")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0.0), help="Divides log-probabilities of every draw; 0 = greedy. diffusion_lm: scales the noise of each reverse step (0 = deterministic DDIM).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True), help="Nucleus sampling mass (not diffusion_lm: no categorical draw).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the samples and settings as JSONL.")
@click.option("--sample-dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True, help="Float type of the Gumbel noise of categorical draws; float32 truncates its tail and lowers entropy (docs/evaluation.md).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@user_errors
@_as_spec_errors
def sample(checkpoint: str, num: int, steps: int | None, sampler: str | None, length: int | None, block: int | None,
           remasking: str, threshold: float, block_length: int | None, cache: str, prompt: str | None, seed: int, temperature: float, top_p: float, out: Path | None,
           sample_dtype: str, device: str) -> None:
    """Draw samples from RUN_OR_CHECKPOINT; print them, the throughput and sample diagnostics."""
    import torch

    from difflm.sampling import SampleOptions, build_template, get_sampler, sample_diagnostics
    from orchestrator.devices import synchronize

    ckpt = _load(checkpoint, device)
    model, tok, spec = ckpt.model, ckpt.tokenizer, ckpt.spec
    trained = spec.data.seq_len
    template = build_template(tok, prompt, length, default_length=trained) if prompt else None
    total = template.length if template is not None else (length or trained)
    name = sampler or model.default_sampler
    fn = get_sampler(model, name)
    options = SampleOptions(
        num=num,
        length=total,
        steps=steps or spec.diffusion.steps_for(spec.data.seq_len),
        temperature=temperature,
        top_p=top_p,
        template=None if template is None else template.ids,
        fixed=None if template is None else template.fixed,
        remasking=remasking,  # type: ignore[arg-type]
        window=trained,
        stride=block,
        sample_dtype=sample_dtype,  # type: ignore[arg-type]
        threshold=threshold,
        block_length=block_length,
        cache=cache,  # type: ignore[arg-type]
    )
    options.validate()
    gen = torch.Generator(device=ckpt.device).manual_seed(seed)

    synchronize(ckpt.device)
    start = time.perf_counter()
    with torch.no_grad():
        result = fn(options, gen)  # bad option combinations raise here, before anything is printed
    synchronize(ckpt.device)
    elapsed = time.perf_counter() - start
    click.echo(f"checkpoint  {ckpt.describe()}")
    click.echo(
        f"sampler     {name}: {num} x {total} tokens, {options.steps} steps, temperature {temperature:g}, "
        f"top-p {top_p:g}, remasking {remasking}, seed {seed}"
        + (f", {sample_dtype} draws" if sample_dtype != "float64" else "")
        + (f", threshold {threshold:g}" if remasking == "threshold" else "")
        + (f", blocks of {block_length}" if block_length else "") + (f", cache {cache}" if cache != "none" else "")
    )
    if template is not None:
        click.echo(f"prompt      {prompt!r} ({template.kind}: {template.num_free} of {total} tokens generated)")
    for note in result.notes:
        click.echo(f"note: {note}")

    rows = result.tokens.cpu()
    free = ~result.fixed.cpu()
    texts = [tok.decode(r.tolist()) for r in rows]
    generated = [tok.decode(r[f].tolist()) for r, f in zip(rows, free)]
    click.echo("")
    for i, text in enumerate(texts):
        click.echo(f"[{i}] {_indent(text)}")
    click.echo("")
    new_tokens = int(free.sum())
    rate = new_tokens / max(elapsed, 1e-9)
    click.echo(f"throughput  {new_tokens} new tokens in {elapsed:.2f} s = {rate:,.0f} tokens/s "
               f"({result.nfe} network calls = NFE, {result.nfe / max(new_tokens / num, 1):.3f} NFE per token)")
    diag = sample_diagnostics(generated)
    what = "generated text" if template is not None else "samples"
    click.echo(f"diagnostics ({what}): {diag.summary()}")
    for warning in diag.warnings:
        click.echo(f"warning: {warning}")
    if out is not None:
        settings = {
            "checkpoint": str(ckpt.path), "family": spec.model.family, "step": ckpt.step, "sampler": name,
            "num": num, "length": total, "steps": options.steps, "temperature": temperature, "top_p": top_p,
            "remasking": remasking, "threshold": threshold, "block_length": block_length, "cache": cache,
            "block": block, "prompt": prompt, "seed": seed, "device": ckpt.device.type,
            "seconds": elapsed, "tokens_per_s": rate, "network_calls": result.nfe,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as fh:
            for i, (text, gen_text, row) in enumerate(zip(texts, generated, rows)):
                line = {"index": i, "text": text, "generated": gen_text, "token_ids": row.tolist(), **settings,
                        "diagnostics": diag.scalars(), "warnings": diag.warnings}
                fh.write(json.dumps(line) + "\n")
        click.echo(f"wrote {len(texts)} samples to {out}")


# ================================================================================== eval


def _source_for(ref: str) -> tuple[str, str | None]:
    """data.source and data.path for ``--data``: builtin, a local file/folder (by extension), else a hub name."""
    from orchestrator.errors import SpecError

    if ref == "builtin":
        return "builtin", None
    p = Path(ref).expanduser()
    local_looking = ref.startswith(("/", "./", "../", "~")) or p.suffix.lower() in LOCAL_SUFFIXES
    if local_looking and not p.exists():
        raise SpecError(f"--data {ref!r} does not exist; give an existing text/jsonl/parquet file or folder, "
                        "'builtin', or a Hugging Face dataset name (e.g. wikitext)")
    if p.is_file():
        suffix = p.suffix.lower()
        return {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "hf"), ref
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "hf", ref
        for ext, source in (("jsonl", "jsonl"), ("parquet", "parquet"), ("txt", "text")):
            if any(p.rglob(f"*.{ext}")):
                return source, ref
        return "hf", ref
    return "hf", ref


def _eval_blocks(ckpt: LoadedCheckpoint, data_ref: str | None, split: str, hf_config: str | None,
                 hf_split: str, text_field: str, max_documents: int | None) -> tuple[np.ndarray, str, bool]:
    """(blocks (N, seq_len) int, description, own) with the checkpoint's tokenizer and seq_len.

    own: the run's own data config, where the val split comes from the same cache entry as in
    training (when it exists; otherwise the same blocks are rebuilt with the saved tokenizer, so a
    BPE tokenizer is never retrained)."""
    from pydantic import ValidationError

    from difflm.data import DataConfig, DataError, load_documents, prepare_data
    from difflm.data.pipeline import META_FILE, cache_key, pack_blocks, split_documents, token_stream
    from orchestrator.errors import SpecError

    spec, tok = ckpt.spec, ckpt.tokenizer
    own = data_ref is None
    if own:
        cfg = spec.data
        where = "the run's data"
    else:
        source, path = _source_for(data_ref)  # type: ignore[arg-type]
        try:
            cfg = DataConfig(
                source=source, path=path, hf_config=hf_config, hf_split=hf_split, text_field=text_field,  # type: ignore[arg-type]
                seq_len=spec.data.seq_len, val_fraction=spec.data.val_fraction, split_seed=spec.data.split_seed,
                max_documents=max_documents, cache_dir=spec.data.cache_dir,
            )
        except ValidationError as exc:
            raise SpecError(f"--data {data_ref!r}: {exc.errors()[0]['msg']}") from None
        where = "the built-in corpus" if source == "builtin" else f"{source} {path}"
    entry = Path(cfg.cache_dir).expanduser().resolve() / cache_key(cfg, spec.tokenizer)
    if own and split != "all" and (entry / META_FILE).is_file():
        prepared = prepare_data(cfg, spec.tokenizer, log=lambda _m: None)
        if prepared.tokenizer.vocab_size != tok.vocab_size:
            raise SpecError(f"the cached data at {entry} has a tokenizer of {prepared.tokenizer.vocab_size} ids but "
                            f"the checkpoint's has {tok.vocab_size}; delete the cache entry and retry")
        blocks = prepared.val if split == "val" else prepared.train
        return blocks, f"{where}, {split} split (cache {entry.name})", own
    docs = load_documents(cfg)
    if split != "all":
        train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed)
        docs = val_docs if split == "val" else train_docs
    blocks = pack_blocks(token_stream(docs, tok), cfg.seq_len, tok.bos_id, tok.eos_id)
    if len(blocks) == 0:
        raise DataError(f"{where} ({split}: {len(docs)} documents) does not fill one block of {cfg.seq_len} tokens; "
                        "use more text or --split all")
    part = f"all {len(docs)} documents" if split == "all" else f"{split} split ({len(docs)} documents)"
    return blocks, f"{where}, {part}", own


@click.command("eval")
@click.argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
@click.option("--data", "data_ref", metavar="PATH|builtin|HF_NAME", help="Text to score (default: the run's own data). A .txt/.jsonl/.parquet file or folder, 'builtin', or a Hugging Face dataset name; tokenized with the run's tokenizer into blocks of its seq_len.")
@click.option("--split", type=click.Choice(["val", "train", "all"]), help="Document split (the run's val_fraction and split_seed) or all documents. Default: val for the run's own data; all of a --data file (held-out text is scored whole).")
@click.option("--samples", "-k", type=click.IntRange(1, 4096), help="Noise draws per sequence (masking rates stratified over one common range); K >= 2 gives the Monte Carlo standard error. Default: the run's train.eval_samples, as training's validation.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per forward (default: the run's micro_batch_size). Changes speed and memory only: each sequence's noise is its own.")
@click.option("--max-batches", type=click.IntRange(min=1), help="Score only the first N x the run's micro_batch_size sequences (default: the run's train.eval_batches on its own val split, else all).")
@click.option("--seed", type=int, help="Noise seed (default: the run's train.eval_seed, as training's validation).")
@click.option("--hf-config", help="Hugging Face dataset config (with an HF_NAME).")
@click.option("--hf-split", default="train", show_default=True, help="Hugging Face split to read.")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in jsonl/parquet/hf records.")
@click.option("--max-documents", type=click.IntRange(min=2), help="Read at most this many documents of --data.")
@click.option("--save", "save_to", type=click.Path(dir_okay=False, path_type=Path), help="Write the per-sequence draws (.npz: indices, sums (N, K), counts) for paired comparisons.")
@click.option("--gen-ppl", "gen_ppl", is_flag=True, help="Generative perplexity + unigram entropy of unconditional samples under --judge (docs/evaluation.md), instead of the NLL.")
@click.option("--judge", "judge_ref", metavar="RUN_OR_HF_DIR", help="Scorer for --gen-ppl / --mauve: a difflm ar run or a local Hugging Face causal LM folder (default: RUN itself when it is an ar run).")
@click.option("--num", "-n", "num", default=64, show_default=True, type=click.IntRange(1, 100_000), help="--gen-ppl / --mauve: samples to draw.")
@click.option("--steps", "steps", metavar="T[,T...]", help="--gen-ppl: sampler steps, comma-separated for the frontier, e.g. 32,128,1000 (default: the run's diffusion.sample_steps).")
@click.option("--sampler", help="--gen-ppl: sampler name (default: the family's default).")
@click.option("--sample-dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True, help="--gen-ppl: float type of the Gumbel noise of categorical draws; float32 lowers entropy (reproduces older published numbers).")
@click.option("--mauve", "mauve_ref", type=click.Path(dir_okay=False, path_type=Path), metavar="REF_FILE", help="MAUVE between --num samples and the first --num lines of REF_FILE with 8+ words (headings '= ... =' skipped), on --judge features (mauve-text).")
@click.option("--plot", "plot_to", type=click.Path(dir_okay=False, path_type=Path), help="--gen-ppl with several --steps: the frontier PNG (default: RUN_DIR/eval/gen_ppl_frontier.png).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON line on stdout (the readable report moves to stderr).")
@user_errors
@_as_spec_errors
def eval_cmd(checkpoint: str, data_ref: str | None, split: str | None, samples: int | None, batch_size: int | None,
             max_batches: int | None, seed: int | None, hf_config: str | None, hf_split: str, text_field: str,
             max_documents: int | None, save_to: Path | None, gen_ppl: bool, judge_ref: str | None, num: int,
             steps: str | None, sampler: str | None, sample_dtype: str, mauve_ref: Path | None, plot_to: Path | None,
             device: str, as_json: bool) -> None:
    """NLL (bound), bits/token and perplexity of RUN_OR_CHECKPOINT on a dataset, float64 sums, with its standard error.

    Scores with :func:`difflm.evaluation.val_pass`, the function training's validation calls: on
    the run's own val split with the defaults it reproduces the checkpoint's val/nll (to float
    rounding), whatever the batch size and the number of workers the run trained with. With
    --gen-ppl / --mauve it samples the run instead and scores the samples with a judge."""
    from difflm.evaluation import RATE_MAX, RATE_MIN, save_val_draws, val_count, val_pass
    from orchestrator.errors import SpecError

    def say(line: str) -> None:  # with --json, stdout carries only the JSON line (pipe it to jq)
        click.echo(line, err=as_json)

    ckpt = _load(checkpoint, device)
    if gen_ppl or mauve_ref is not None:
        from orchestrator.eval.cli import sample_quality

        result_q = sample_quality(ckpt, say, gen_ppl=gen_ppl, judge_ref=judge_ref, num=num, steps=steps,
                                  sampler=sampler, sample_dtype=sample_dtype, seed=seed or 0,
                                  batch=batch_size or 64, mauve_ref=mauve_ref, plot_to=plot_to)
        if as_json:
            click.echo(json.dumps(result_q))
        return
    if split is None:
        split = "val" if data_ref is None else "all"
    model, spec = ckpt.model, ckpt.spec
    t = spec.train
    blocks, described, own = _eval_blocks(ckpt, data_ref, split, hf_config, hf_split, text_field, max_documents)
    bs = batch_size or t.micro_batch_size
    training_protocol = own and split == "val"
    cap = max_batches if max_batches is not None else (t.eval_batches if training_protocol else None)
    num = val_count(len(blocks), cap, t.micro_batch_size)
    k = samples or t.eval_samples
    base_seed = t.eval_seed if seed is None else seed

    say(f"checkpoint  {ckpt.describe()}")
    say(f"data        {described}: {len(blocks)} blocks x {blocks.shape[1]} tokens"
        + (f", the first {num} scored" if num < len(blocks) else ""))
    say(f"protocol    batch {bs}, noise seed {base_seed}, {k} draw(s) per sequence "
        f"(masking rates importance-sampled over ({RATE_MIN:g}, {RATE_MAX:g}], stratified)")

    start = time.perf_counter()
    draws = val_pass(model, blocks, 0, num, batch_size=bs, samples=k, seed=base_seed, device=ckpt.device)
    elapsed = time.perf_counter() - start
    if draws.tokens == 0:
        raise SpecError("no tokens were scored: the data produced no blocks")
    draws.meta = {"seed": base_seed, "samples": k, "family": spec.model.family, "step": ckpt.step,
                  "rate_min": RATE_MIN, "rate_max": RATE_MAX, "checkpoint": str(ckpt.path)}
    mean, se = draws.nll, draws.se
    se_single = se * math.sqrt(k) if math.isfinite(se) else math.nan
    ln2 = math.log(2)
    kind = "NLL (exact)" if model.exact_likelihood else "NLL bound"
    pm = f" ± {se:.4f}" if math.isfinite(se) else ""
    pm_bits = f" ± {se / ln2:.4f}" if math.isfinite(se) else ""
    say(f"{kind:<11} {mean:.4f}{pm} nats/token over {draws.tokens:,.0f} tokens ({elapsed:.1f} s)")
    say(f"bits/token  {mean / ln2:.4f}{pm_bits}")
    ppl = math.exp(min(mean, 700.0))
    ppl_text = f"{ppl:.3f}" if ppl < 1e6 else f"{ppl:.4g}"  # a loose bound's huge value as 7.966e+34
    say(f"perplexity  {'' if model.exact_likelihood else '<= '}{ppl_text}")
    if k == 1:
        say("MC error    not estimated with one draw per sequence; use --samples K (K >= 2)")
    elif model.exact_likelihood:
        say("MC error    none: the NLL is exact, every draw is the same")
    else:
        say(f"MC error    ± {se:.4f} nats/token (standard error of this {k}-draw estimate; "
            f"one draw per sequence would have ± {se_single:.4f})")
    result: dict[str, Any] = {
        "checkpoint": str(ckpt.path), "data": described, "blocks": int(len(blocks)), "sequences": num,
        "tokens": draws.tokens, "samples": k, "seed": base_seed, "nll": mean,
        "nll_se": se if math.isfinite(se) else None,
        "nll_se_one_draw": se_single if math.isfinite(se_single) else None,
        "bits_per_token": mean / ln2, "perplexity": math.exp(min(mean, 700.0)),
    }
    train_val = ckpt.val_nll
    if training_protocol and train_val is not None and max_batches is None:
        diff = mean - train_val
        if base_seed == t.eval_seed and k == t.eval_samples:
            same = abs(diff) <= 1e-6 * max(1.0, abs(train_val))
            verdict = "reproduced, to float rounding" if same else (
                "not reproduced: the device or precision differ from training's validation, or an older "
                "difflm (before the shared val protocol) validated this checkpoint"
            )
            say(f"training    val/nll {train_val:.10f} at step {ckpt.step}; difference {diff:+.3e} ({verdict})")
        else:
            train_se = ckpt.trainer_state.get("val", {}).get("val/nll_se")
            combined = math.hypot(se if math.isfinite(se) else 0.0, train_se or 0.0)
            z = diff / combined if combined > 0 else 0.0
            say(f"training    val/nll {train_val:.4f} ± {train_se or 0.0:.4f} at step {ckpt.step} "
                f"(seed {t.eval_seed}, {t.eval_samples} draws); difference {diff:+.4f} = {z:+.2f} combined standard errors")
        result["training_val_nll"] = train_val
        result["difference"] = diff
    if save_to is not None:
        save_val_draws(save_to, draws)
        say(f"draws       per-sequence sums written to {save_to}")
    if as_json:
        click.echo(json.dumps(result))


# =============================================================================== denoise


def _render_corrupted(tok: Tokenizer, ids: list[int], noised: list[bool], mark: str = "_") -> str:
    """Decode runs of kept tokens; each noised token shows as ``mark``."""
    out: list[str] = []
    run: list[int] = []
    for i, hidden in zip(ids, noised):
        if hidden:
            if run:
                out.append(tok.decode(run))
                run = []
            out.append(mark)
        else:
            run.append(i)
    if run:
        out.append(tok.decode(run))
    return "".join(out)


def _parse_levels(levels: str) -> list[float]:
    from orchestrator.errors import SpecError

    try:
        values = [float(v) for v in levels.split(",") if v.strip()]
    except ValueError:
        raise SpecError(f"--t {levels!r}: give comma-separated noise levels in [0, 1], e.g. 0.1,0.5,0.9") from None
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if not values or bad:
        raise SpecError(f"--t {levels!r}: every noise level must be in [0, 1], e.g. 0.1,0.5,0.9")
    return values


def _fmt_metric(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.3f}"


@click.command()
@click.argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
@click.option("--text", required=True, help="Clean text to corrupt and reconstruct.")
@click.option("--t", "levels", default="0.1,0.5,0.9", show_default=True, help="Comma-separated noise levels in [0, 1].")
@click.option("--steps", default=0, show_default=True, type=click.IntRange(min=0), help=f"{DENOISE_STEPS_HELP}. 0: one-shot reconstruction (mdlm: argmax of p(x0|x_t); diffusion_lm: x0_hat rounded); N: the family's sampler from t in N steps.")
@click.option("--seed", default=0, show_default=True, help="Seed of the corruption (the same seed nests the corruptions: what t=0.1 hides, t=0.5 hides too).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@user_errors
@_as_spec_errors
def denoise(checkpoint: str, text: str, levels: str, steps: int, seed: int, device: str) -> None:
    """Corrupt --text at each noise level and show corruption and reconstruction with token accuracy."""
    import torch

    from difflm.evaluation import counted_positions
    from difflm.types import Denoiser
    from orchestrator.errors import SpecError

    values = _parse_levels(levels)
    ckpt = _load(checkpoint, device)
    tok, model = ckpt.tokenizer, ckpt.model
    body = tok.encode(text)
    if not body:
        raise SpecError("--text is empty after tokenization; give some text")
    limit = ckpt.spec.data.seq_len - 2
    note = ""
    if len(body) > limit:
        note = f" (cut to the first {limit}: the trained length is {limit + 2} with BOS and EOS)"
        body = body[:limit]
    ids = torch.tensor([[tok.bos_id, *body, tok.eos_id]], device=ckpt.device)  # (1, L)
    valid = counted_positions(ids)  # corrupt only the text, never BOS/EOS: what training noises
    original = tok.decode(body)
    if not isinstance(model, Denoiser):  # an optional hook (difflm.types.Denoiser)
        raise SpecError(
            f"family {model.name!r} has no denoise hook: no noise process to corrupt and reconstruct (as ar); "
            "denoise works with diffusion families (e.g. mdlm). Use `difflm eval` for its NLL"
        )
    results = []
    for t in values:  # all levels first: a bad level fails before anything is printed
        gen = torch.Generator(device=ckpt.device).manual_seed(seed)
        with torch.no_grad():
            results.append(model.denoise(ids, valid, t, gen, steps or None))
    click.echo(f"checkpoint     {ckpt.describe()}")
    click.echo(f"text           {len(body)} tokens{note}")
    first = results[0]
    click.echo(f"reconstruction {first.method}" + ("; _ marks a corrupted token" if first.noised is not None else ""))
    if first.corrupted is None and getattr(first, "corrupted_view", None) is not None:
        label = getattr(first, "corrupted_view_label", "") or "a token view of the continuous noise"
        click.echo(f"corrupted      {label}; \u00b7 marks an unprintable character")
    for t, res in zip(values, results):
        m = dict(res.metrics)
        acc = m.pop("accuracy", math.nan)
        masked_acc = m.pop("masked_accuracy", None)
        rate = m.pop("mask_rate", None)
        head = f"t={t:g}"
        if rate is not None and res.noised is not None:
            n_noised = int(res.noised.sum())
            head += f"  corrupted {n_noised}/{len(body)} tokens ({rate:.0%})"
        head += f"  token accuracy {_fmt_metric(acc)}"
        if masked_acc is not None:
            head += f" (on corrupted tokens {_fmt_metric(masked_acc)})"
        head += "".join(f"  {k} {_fmt_metric(v)}" for k, v in m.items())
        click.echo("")
        click.echo(head)
        click.echo(f"  original      {_indent(original)}")
        view = getattr(res, "corrupted_view", None)  # a token picture of a continuous corruption, if any
        if res.corrupted is not None and res.noised is not None:
            shown = _render_corrupted(tok, res.corrupted[0, 1:-1].tolist(), res.noised[0, 1:-1].tolist())
            click.echo(f"  corrupted     {_indent(shown)}")
        elif view is not None:
            pieces = [tok.decode([i]) for i in view[0, 1:-1].tolist()]  # token by token: aligned with the original
            noisy = "".join(c if c.isprintable() else "\u00b7" for c in "".join(pieces))
            click.echo(f"  corrupted     {noisy}")
        else:
            click.echo("  corrupted     (continuous noise: no token view)")
        click.echo(f"  reconstructed {_indent(tok.decode(res.reconstructed[0, 1:-1].tolist()))}")


# ================================================================================ export


@click.command("export")
@click.argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
@click.option("--to", "to", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write (new or empty).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --to folder.")
@click.option("--push", "push_repo", metavar="REPO", help="Also upload the folder to this Hugging Face Hub repo (needs a reachable hub and a token).")
@user_errors
def export(checkpoint: str, to: Path, overwrite: bool, push_repo: str | None) -> None:
    """Write a self-contained model folder (safetensors weights, spec, tokenizer, model card, eval results).

    `difflm sample DIR`, `difflm eval DIR` and `load_checkpoint(DIR)` load it without the run folder."""
    from orchestrator.eval.export import export_run, push

    ckpt = _load(checkpoint, "cpu")
    out = export_run(ckpt, to, overwrite=overwrite)
    click.echo(f"exported    {ckpt.describe()} -> {out}")
    click.echo(f"files       {', '.join(sorted(p.name for p in out.iterdir()))}")
    click.echo(f"load        difflm sample {out}   |   python: load_checkpoint({str(out)!r}) (see {out / 'README.md'})")
    if push_repo:
        click.echo(f"pushed      {push(out, push_repo)}")
