"""The throughput report as the markdown block docs/benchmarks.md takes verbatim (`difflm bench`)."""

from __future__ import annotations

from typing import Any


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def _relative(row: dict[str, Any]) -> str:
    """``0.981x [0.968, 0.994]``: the paired ratio and its interval (just the ratio below 3 rounds)."""
    ci = row.get("relative_ci95")
    text = _num(row["relative"], ".3f", "x")
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


#: The gap the bench must be able to see: an interval at most this wide resolves it.
RESOLVE = 0.03


def resolution_lines(report: dict[str, Any]) -> list[str]:
    """Per path: whether its interval is narrow enough to resolve a 3% gap, and where it lies against 0.97x."""
    out = []
    for row in report["paths"]:
        ci = row.get("relative_ci95")
        if row["path"] == "bare" or row.get("relative") is None:
            continue
        if not ci:
            out.append(f"- {row['path']}: {row['relative']:.3f}x over fewer than 3 paired rounds: no interval; "
                       "raise --rounds to resolve 3%")
            continue
        width = ci[1] - ci[0]
        verdict = ("at or above 0.97x" if ci[0] >= 1 - RESOLVE else "below 0.97x" if ci[1] < 1 - RESOLVE
                   else "not separated from 0.97x")
        resolved = "resolves" if width <= RESOLVE else "does NOT resolve"
        out.append(f"- {row['path']}: {row['relative']:.3f}x ± {row['relative_se']:.3f} (SE), 95% interval "
                   f"[{ci[0]:.3f}, {ci[1]:.3f}], {width * 100:.1f}% wide: {resolved} 3%; {verdict}")
    return out


def format_markdown(report: dict[str, Any]) -> str:
    """Header (date, machine, load, command, model, peak) and one table row per path."""
    m, model, cfg = report["machine"], report["model"], report["config"]
    peak = report["peak"]["flops"]
    unit, scale = ("TFLOP/s", 1e12) if peak >= 1e13 else ("GFLOP/s", 1e9)
    gpu = f"GPU {m['gpu']}" if m["gpu"] else "no GPU"
    load = report["load_avg_1min"]
    params = f"{model['parameters']:,} parameters, " if model["parameters"] else ""
    flops = report["flops_per_step"]
    lines = [
        f"- Date: {report['date']}; machine: {m['cpu']}, {m['cpus']} CPUs ({m['threads']} threads used), {gpu}; "
        f"torch {m['torch']}, DeepSpeed {m['deepspeed']}, Ray {m['ray']}",
        f"- Load average (1 min) before / after: {_num(load['before'], '.2f')} / {_num(load['after'], '.2f')}"
        " (other jobs on the machine slow every path; interleaved rounds spread that evenly, not away)",
        f"- Command: `{report['command']}`",
        f"- Model: {model['family']} {model['size']}, {params}vocab {model['vocab']:,}, "
        f"seq {model['seq_len']} x batch {model['batch']} = {model['tokens_per_step']:,} tokens/step, "
        f"{model['precision']} on {model['device']}"
        + (f"; {flops / 1e9:,.1f} GFLOP/step (matmuls, counted)" if flops else ""),
        f"- Peak: {peak / scale:,.1f} {unit} ({report['peak']['source']})",
        f"- {cfg['rounds']} interleaved round(s) x {cfg['steps']} timed steps per path after {cfg['warmup']} "
        "warm-up step(s); tokens/s = median over rounds of each round's tokens per median step, step times "
        "pooled over rounds; vs bare = mean of the "
        "per-round ratios to the bare loop [bootstrap 95% interval over rounds]",
        "",
        f"| path | tokens/s | vs bare | step p50 (ms) | step p90 (ms) | {unit} | utilisation | "
        "peak memory (MiB) | first step (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["paths"]:
        if row.get("error") and not row["tokens_per_s"]:
            lines.append(f"| {row['label']} | failed: {row['error']} |  |  |  |  |  |  |  |")
            continue
        achieved = None if row["achieved_flops"] is None else row["achieved_flops"] / scale
        lines.append(
            f"| {row['label']} | {_num(row['tokens_per_s'], ',.0f')} | {_relative(row)} | "
            f"{_num(row['step_ms_p50'], ',.1f')} | {_num(row['step_ms_p90'], ',.1f')} | {_num(achieved, ',.1f')} | "
            f"{_num(None if row['utilisation'] is None else 100 * row['utilisation'], '.1f', '%')} | "
            f"{_num(row['peak_memory_mb'], ',.0f')} | {_num(row['first_step_s'], '.1f')} |"
        )
    lines += ["", *resolution_lines(report)]
    lines += [
        "",
        "First step: in-process paths from building the model (libraries already imported) to the end of the "
        "first optimizer step; `difflm train` from the command's start (Python, Ray, workers, DeepSpeed, "
        "no step-0 eval: `train.eval_at_start: false`). Peak memory: above the process's memory before the model was built "
        "(CUDA: allocator peak; CPU: resident-set high-water mark). `difflm train` runs with `log_every: 1`, "
        "so its step times include a metrics read and a TensorBoard write per step.",
        f"Runs and report.json: {report['folder']}",
    ]
    return "\n".join(lines)
