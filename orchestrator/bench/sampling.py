"""Benchmark: sampling speed against quality on one checkpoint, in one process.

    difflm bench sampling runs/quickstart --steps 1000 --length 128 --num 1 --num 4
    difflm bench sampling runs/wt2 --length 256 --num 1 --num 16 --setting threshold=0.9,block=32,cache=dual

(the options live on the click command in orchestrator/cli/bench.py, so ``--help`` lists them).

Two tables. The first (masked families with both samplers) is ``ddpm`` against ``ddpm_cache``: same
seed, alternating order over ``--repeats`` rounds, best wall time, network calls, identical tokens.
The second is the trade-off frontier: for every ``--setting`` (default: :data:`DEFAULT_SETTINGS`) and
batch size, the best tokens/s, the network evaluations (NFE) per generated token, and a quality figure:

* without ``--judge``: agreement with the first setting's tokens (share of positions with the same id,
  same seed), a val-NLL-free proxy. Run it at ``--temperature 0`` (the default then), so the draws
  are argmaxes and the figure measures how far the faster decode departs from the careful one
  (default reference: one token per step, most confident first);
* with ``--judge`` (an ar run or a Hugging Face causal LM): gen-PPL and unigram entropy of the samples
  (orchestrator/eval/genppl.py), at ``--temperature`` (default 1).

The frontier is also drawn as a PNG (x: tokens/s, y: the quality figure; one marker per batch size,
the settings numbered in a key beside it).
A setting is ``key=value`` pairs joined by commas: ``sampler`` (family sampler name), ``remasking``
(random | low_confidence | threshold), ``threshold`` (implies remasking threshold), ``block`` (block
length), ``cache`` (none | prefix | dual), ``steps``. Not a timed test: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator.devices import synchronize

#: the frontier's default settings for masked families (the first is the quality reference);
#: ``L`` stands for the sample length
DEFAULT_SETTINGS: tuple[str, ...] = (
    "remasking=low_confidence,steps=L", "ddpm", "remasking=low_confidence", "threshold=0.9", "threshold=0.7",
    "threshold=0.9,block=32", "threshold=0.9,block=32,cache=prefix", "threshold=0.9,block=32,cache=dual",
)
#: bd3lm's (it decodes in its trained blocks, with the exact cache unless the sampler says uncached)
BD3LM_SETTINGS: tuple[str, ...] = (
    "remasking=low_confidence,steps=L", "sampler=ddpm_uncached", "sampler=ddpm", "threshold=0.9",
    "threshold=0.7",
)


def _time_one(sampler, options, seed: int, device: torch.device):  # type: ignore[no-untyped-def]
    gen = torch.Generator(device=device).manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = sampler(options, gen)
    synchronize(device)
    return time.perf_counter() - start, out


@dataclass(frozen=True)
class SamplingBench:
    """What ``difflm bench sampling`` was asked (its click options)."""

    checkpoint: str
    steps: int
    length: int
    num: list[int]
    repeats: int
    seed: int
    device: str
    threads: int | None
    settings: list[str] = field(default_factory=list)
    judge: str | None = None
    temperature: float | None = None
    plot: str | None = None
    compare_cache: bool = True


def parse_setting(text: str, length: int, steps: int) -> tuple[str | None, dict[str, Any]]:
    """``key=value,...`` -> (sampler name or None, SampleOptions fields). ValueError naming the bad key."""
    sampler: str | None = None
    fields: dict[str, Any] = {"steps": steps}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            if part in ("ddpm", "ddpm_cache", "analytic", "ddpm_uncached"):
                sampler = part
                continue
            raise ValueError(f"setting {text!r}: {part!r} is not key=value (keys: sampler, remasking, threshold, "
                             "block, cache, steps)")
        key, value = (s.strip() for s in part.split("=", 1))
        if key == "sampler":
            sampler = value
        elif key == "remasking":
            fields["remasking"] = value
        elif key == "threshold":
            fields["remasking"], fields["threshold"] = "threshold", float(value)
        elif key == "block":
            fields["block_length"] = min(int(value), length)
        elif key == "cache":
            fields["cache"] = value
        elif key == "steps":
            fields["steps"] = length if value == "L" else int(value)
        else:
            raise ValueError(f"setting {text!r}: unknown key {key!r}; use sampler, remasking, threshold, block, "
                             "cache or steps")
    return sampler, fields


@dataclass
class Point:
    setting: str
    num: int
    seconds: float
    nfe: int
    length: int
    quality: float
    quality_se: float = 0.0
    entropy: float = float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.num * self.length / max(self.seconds, 1e-9)

    @property
    def nfe_per_token(self) -> float:
        return self.nfe / self.length


def run_sampling_bench(args: SamplingBench) -> int:
    """Print the markdown tables (and write the PNG); 0, or 2 for a checkpoint or setting it cannot use."""
    from difflm.sampling import SampleOptions, SamplingError, get_sampler
    from orchestrator.errors import SpecError
    from orchestrator.rundir.checkpoints import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ckpt = load_checkpoint(args.checkpoint, args.device)
    except (SpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = ckpt.model
    names = model.samplers()
    print(f"checkpoint {ckpt.describe()}, {model.num_parameters():,} parameters")
    print(f"machine    {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"device {ckpt.device}")
    print(f"settings   T = {args.steps} steps, L = {args.length}, seed {args.seed}, best of {args.repeats}")
    if args.compare_cache and {"ddpm", "ddpm_cache"} <= set(names):
        _cache_table(args, ckpt)
    settings = args.settings or list(BD3LM_SETTINGS if model.name == "bd3lm" else DEFAULT_SETTINGS)
    temperature = args.temperature if args.temperature is not None else (1.0 if args.judge else 0.0)
    judge = None
    if args.judge:
        from orchestrator.eval.judge import load_judge

        try:
            judge = load_judge(args.judge, ckpt.device)
        except SpecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    plans = []
    for text in settings:
        try:
            sampler, fields = parse_setting(text, args.length, args.steps)
            fn = get_sampler(model, sampler or model.default_sampler)
            SampleOptions(num=1, length=args.length, **fields).validate()
        except (ValueError, SamplingError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        plans.append((text, fn, fields))
    quality = "gen-PPL (judge) / entropy" if judge else "agreement with the first setting"
    print("")
    print(f"trade-off at temperature {temperature:g}; quality = {quality}")
    print("")
    print("| setting | samples | tokens/s | NFE per token | s | quality |")
    print("|:---|---:|---:|---:|---:|---:|")
    points: list[Point] = []
    for num in args.num:
        reference: torch.Tensor | None = None
        for text, fn, fields in plans:
            options = SampleOptions(num=num, length=args.length, temperature=temperature, **fields)
            best, out = float("inf"), None
            for _ in range(args.repeats):
                try:
                    seconds, out = _time_one(fn, options, args.seed, ckpt.device)
                except SamplingError as exc:
                    print(f"error: setting {text!r}: {exc}", file=sys.stderr)
                    return 2
                best = min(best, seconds)
            assert out is not None
            tokens = out.tokens.cpu()
            if judge is not None:
                from difflm.metrics.genppl import gen_ppl
                from orchestrator.eval.genppl import score_samples

                ids = [r.tolist() for r in tokens]
                sums, counts, _ = score_samples(ckpt, judge, ids)
                m = gen_ppl(sums, counts, ids)
                point = Point(text, num, best, out.nfe, args.length, m.ppl, m.ppl_se, m.entropy)
                se = f" ± {m.ppl_se:.1f}" if math.isfinite(m.ppl_se) else ""  # one sample: no SE
                q = f"{m.ppl:.1f}{se} / {m.entropy:.2f}"
            else:
                reference = tokens if reference is None else reference
                agree = float((tokens == reference).float().mean())
                point = Point(text, num, best, out.nfe, args.length, agree)
                q = f"{agree:.3f}"
            points.append(point)
            print(f"| {text} | {num} | {point.tokens_per_s:,.0f} | {point.nfe_per_token:.3f} | {best:.2f} | {q} |",
                  flush=True)
    path = Path(args.plot) if args.plot else _default_plot(ckpt)
    plot_frontier(points, path, f"{ckpt.describe()}, L={args.length}", "gen-PPL" if judge else "agreement")
    print(f"\nfrontier   {path}")
    return 0


def _default_plot(ckpt: Any) -> Path:
    from orchestrator.eval.genppl import eval_dir

    return eval_dir(Path(ckpt.path)) / "sampling_frontier.png"


def plot_frontier(points: list[Point], path: Path, title: str, ylabel: str) -> Path:
    """Speed against quality: tokens/s (x, log) against the quality figure (y), one marker per batch size.

    Speed, not NFE, is the x axis: a cache keeps the network calls and cuts their cost, so on an NFE axis
    every cached setting would sit on top of its uncached one. Points carry a number; the key beside the
    plot names each setting (NFE per token is in the printed table), so long setting strings do not overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(p.setting for p in points))  # first-seen order
    number = {name: i + 1 for i, name in enumerate(settings)}
    fig, (ax, key) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for marker, num in zip("osD^v<>", sorted({p.num for p in points})):
        pts = [p for p in points if p.num == num]
        ax.scatter([p.tokens_per_s for p in pts], [p.quality for p in pts], marker=marker, label=f"batch {num}")
        for p in pts:
            ax.annotate(str(number[p.setting]), (p.tokens_per_s, p.quality), textcoords="offset points",
                        xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("tokens / s (higher is faster)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    key.axis("off")
    key.text(0.0, 1.0, "\n".join(f"{number[n]}. {n}" for n in settings),
             va="top", ha="left", fontsize=7, family="monospace", transform=key.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cache_table(args: SamplingBench, ckpt: Any) -> None:
    """ddpm vs ddpm_cache: best time, network calls, identical tokens (the table `make gpu-check` keeps)."""
    from difflm.sampling import SampleOptions, get_sampler

    samplers = {name: get_sampler(ckpt.model, name) for name in ("ddpm", "ddpm_cache")}
    print("")
    print("| samples | ddpm s | ddpm calls | ddpm_cache s | ddpm_cache calls | speed-up | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    for num in args.num:
        options = SampleOptions(num=num, length=args.length, steps=args.steps)
        best: dict[str, float] = {}
        tokens: dict[str, torch.Tensor] = {}
        calls: dict[str, int] = {}
        order = ["ddpm", "ddpm_cache"]
        for r in range(args.repeats):
            for name in order if r % 2 == 0 else order[::-1]:
                seconds, out = _time_one(samplers[name], options, args.seed, ckpt.device)
                best[name] = min(best.get(name, float("inf")), seconds)
                tokens[name], calls[name] = out.tokens.cpu(), out.nfe
        same = torch.equal(tokens["ddpm"], tokens["ddpm_cache"])
        print(f"| {num} | {best['ddpm']:.2f} | {calls['ddpm']} | {best['ddpm_cache']:.2f} | {calls['ddpm_cache']} | "
              f"{best['ddpm'] / best['ddpm_cache']:.1f}x | {'yes' if same else 'NO'} |", flush=True)
