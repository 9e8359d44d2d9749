"""The sample-quality half of `difflm eval` (--gen-ppl, --mauve): parse, run, print, save."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from orchestrator.errors import SpecError


def parse_steps(steps: str | None, default: int) -> list[int]:
    """``"32,128,1000"`` -> [32, 128, 1000]; SpecError naming the bad value."""
    if steps is None:
        return [default]
    try:
        values = [int(v) for v in steps.split(",") if v.strip()]
    except ValueError:
        raise SpecError(f"--steps {steps!r}: give comma-separated positive integers, e.g. 32,128,1000") from None
    if not values or any(v < 1 for v in values):
        raise SpecError(f"--steps {steps!r}: give comma-separated positive integers, e.g. 32,128,1000")
    return values


def sample_quality(ckpt: Any, say: Callable[[str], None], *, gen_ppl: bool, judge_ref: str | None, num: int,
                   steps: str | None, sampler: str | None, sample_dtype: str, seed: int, batch: int,
                   mauve_ref: Path | None, plot_to: Path | None) -> dict[str, Any]:
    """Run --gen-ppl and/or --mauve on a loaded checkpoint; print the report, save RUN_DIR/eval/*.json."""
    from orchestrator.eval.genppl import eval_dir, frontier_table, gen_point, plot_frontier, save_results
    from orchestrator.eval.judge import DifflmJudge, load_judge

    if judge_ref is None:
        if not ckpt.model.exact_likelihood:
            raise SpecError("--gen-ppl / --mauve need --judge RUN_OR_HF_DIR: a difflm ar run or a local Hugging Face "
                            f"causal LM folder ({ckpt.spec.model.family} cannot judge its own samples)")
        judge: Any = DifflmJudge(ckpt=ckpt)
    else:
        judge = load_judge(judge_ref, ckpt.device)
    grid = parse_steps(steps, ckpt.spec.diffusion.steps_for(ckpt.spec.data.seq_len))
    name = sampler or ckpt.model.default_sampler
    say(f"checkpoint  {ckpt.describe()}")
    say(f"judge       {judge.name}")
    say(f"protocol    {num} unconditional samples x {ckpt.spec.data.seq_len} tokens, sampler {name}, "
        f"{sample_dtype} categorical draws, seed {seed}; each cut at its first EOS; judge windows of "
        f"{judge.context} tokens (half-context overlap), never truncated")
    result: dict[str, Any] = {"checkpoint": str(ckpt.path), "family": ckpt.spec.model.family, "step": ckpt.step,
                              "judge": judge.name, "sampler": name, "sample_dtype": sample_dtype, "seed": seed,
                              "num": num}
    points = []
    if gen_ppl:
        for t in grid:
            p = gen_point(ckpt, judge, num, t, sampler, sample_dtype, seed, batch)
            points.append(p)
            m = p.metrics
            for note in p.notes:
                say(f"note: {note}")
            say(f"T={t:<5} gen-PPL {m.ppl:.2f} ± {m.ppl_se:.2f} ({m.nll:.4f} ± {m.nll_se:.4f} nats/judge token, "
                f"{m.judge_tokens:,.0f} judge tokens); entropy {m.entropy:.3f} ± {m.entropy_se:.3f} nats; "
                f"{p.seconds:.1f} s sampling")
            d = p.diagnostics
            say(f"        distinct-1/2/3 {d.get('distinct_1', float('nan')):.3f}/{d.get('distinct_2', float('nan')):.3f}/"
                f"{d.get('distinct_3', float('nan')):.3f}, repeated trigrams {d.get('repeated_ngram_rate', float('nan')):.3f}"
                f" ± {p.repetition_se:.3f}, duplicates {d.get('duplicate_fraction', float('nan')):.3f}")
        result["gen_ppl"] = [p.row() for p in points]
        if len(points) > 1:
            say("")
            for line in frontier_table(points):
                say(line)
            png = plot_to or eval_dir(ckpt.path) / "gen_ppl_frontier.png"
            plot_frontier(points, png, f"{ckpt.spec.model.family} ({num} samples, {sample_dtype}) judged by {judge.name}")
            say(f"plot        {png}")
            result["plot"] = str(png)
    if mauve_ref is not None:
        from orchestrator.eval.genppl import draw_samples
        from orchestrator.eval.mauve import mauve_score, reference_texts

        if points:
            texts = points[-1].texts
        else:
            ids, _, _ = draw_samples(ckpt, num, grid[-1], sampler, sample_dtype, seed, batch)
            texts = [ckpt.tokenizer.decode(s) for s in ids]
        refs = reference_texts(mauve_ref, num)
        score, settings = mauve_score(judge.features(texts).numpy(), judge.features(refs).numpy())
        say(f"MAUVE       {score:.4f} ({len(texts)} samples at T={grid[-1]} vs {len(refs)} lines of {mauve_ref}; "
            + ", ".join(f"{k} {v}" for k, v in settings.items()) + ")")
        result["mauve"] = {"score": score, "reference": str(mauve_ref), "steps": grid[-1], **settings}
    # --mauve alone goes to its own file: it must not replace the gen-PPL results `difflm results` reads
    saved = save_results(eval_dir(ckpt.path), "sample_quality" if gen_ppl else "mauve", result)
    say(f"saved       {saved}")
    return result
