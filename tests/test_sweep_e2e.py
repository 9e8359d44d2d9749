"""`difflm sweep` end to end through the real CLI (Ray Tune + DeepSpeed on CPU; one-worker trials train in
their Tune actor, orchestrator/sweep/in_trial.py).

Slow by nature; sized to a few minutes in all on 2 cores.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from orchestrator.cluster.procs import processes_under, stop_processes
from tests.helpers import result_rows

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )


def _results(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def _rows_at(trial_dir: Path, step: int) -> dict[str, float]:
    """The trial's Tune result row of the eval at ``step``."""
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    return next(r for r in rows if r.get("step") == step)




def _last_step(trial_dir: Path) -> int:
    """The last step a trial reported to Tune (its result.json)."""
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    return max(int(r.get("step", 0)) for r in rows)


def test_quickstart_sweep_asha(tmp_path: Path) -> None:
    """The README's main job: 4 trials x 1 worker, ASHA stops at least one early, complete table + HParams."""
    # with the step-0 eval a trial skips by default, for the common-random-number check below
    proc = _cli("sweep", "sweeps/quickstart.yaml", "--set", f"output.dir={tmp_path}", "--set", "train.eval_at_start=true",
                "--set", "sweep.seeds=1")  # one seed here: the 2 x 2 replicate test below covers seeds
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "Traceback" not in log
    sweep_dir = tmp_path / "quickstart-sweep"
    rows = _results(sweep_dir)
    assert len(rows) == 4
    assert {r["diffusion.schedule"] for r in rows} == {"loglinear", "linear", "cosine", "geometric"}
    assert all(r["status"] == "TERMINATED" and float(r["val_nll_mean"]) > 0 and r["n_seeds"] == "1" for r in rows)
    assert any(r["stopped_early"] == "True" for r in rows), rows
    assert any(int(r["steps"]) == 60 for r in rows)
    best = [r for r in rows if r["is_best"] == "True"]
    assert len(best) == 1 and best[0]["rank"] == "1" and best[0]["full_budget"] == "True"
    full = [r for r in rows if r["full_budget"] == "True"]
    assert float(best[0]["val_nll_mean"]) == min(float(r["val_nll_mean"]) for r in full)
    for r in rows:  # every difference is taken at the step the trial reached, against the best at that step
        assert r["rank"] == "1" or int(r["diff_at_step"]) == int(r["step"]), r
    assert all(Path(r["best_checkpoint"], "model.safetensors").exists() for r in rows)
    assert "| 1 (best) |" in proc.stdout
    for png in ("val_nll_vs_step.png", "params_vs_objective.png"):
        assert (sweep_dir / png).stat().st_size > 5000
    for r in rows:
        acc = EventAccumulator(str(Path(r["trial_dir"]) / "tensorboard" / "hparams"))
        acc.Reload()
        assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
        assert acc.Scalars("hparams/config_val_nll_mean")[-1].value == pytest.approx(float(r["val_nll_mean"]), rel=1e-5)
        assert "val/nll" in EventAccumulator(str(Path(r["trial_dir"]) / "tensorboard")).Reload().Tags()["scalars"]
    # `difflm results` rebuilds the same ranking from disk
    again = _cli("results", str(sweep_dir))
    assert again.returncode == 0 and "| 1 (best) |" in again.stdout
    assert [r["trials"] for r in _results(sweep_dir)] == [r["trials"] for r in rows]
    # Common random numbers: the four untrained models (same init seed, no time conditioning) read the same
    # val NLL at step 0 whatever their schedule (before: 5.07 / 5.50 / 5.56 / 5.63).
    step0 = [_rows_at(Path(r["trial_dir"]), 0)["val/nll"] for r in rows]
    assert max(step0) - min(step0) <= 1e-4, step0
    # error bars: mean ± SE, the difference to the best ± its SE at a step, ties, and the verdict line
    assert "val/nll mean ± SE" in proc.stdout and "Δ to best ± SE" in proc.stdout
    assert "1 training seed: add sweep.seeds to compare training runs" in proc.stdout, proc.stdout
    assert "is separated" not in proc.stdout
    for r in rows:
        assert 0 < float(r["val_nll_se"]) < 0.05, r  # eval_samples 16: ~0.016 nats/token at this size
        assert r["rank"] == "1" or (float(r["diff_se"]) > 0 and r["paired"] == "True"), r
        draws = sorted(p.name for p in (Path(r["trial_dir"]) / "train" / "val").iterdir())
        assert draws[0] == "step_0000000.npz" and f"step_{int(r['step']):07d}.npz" in draws, draws
        tags = EventAccumulator(str(Path(r["trial_dir"]) / "tensorboard")).Reload().Tags()["scalars"]
        assert "val/nll_se" in tags
    tied = [r for r in rows if r["tied"] == "True"]
    assert not tied or any(r["rank"] == "1" for r in tied)  # a tie always includes the best


REPLICATE_SPEC = """
model: {family: mdlm, size: null, d_model: 32, n_layers: 1, n_heads: 2, cond_dim: 16}
diffusion: {sample_steps: 4}
data: {source: builtin, seq_len: 32, max_documents: 300}
train: {max_steps: 30, micro_batch_size: 8, warmup_steps: 1, eval_every: 10, checkpoint_every: 30, log_every: 10,
        num_samples: 1, eval_samples: 2, eval_batches: 4}
scaling: {num_workers: 1, device: cpu, zero_stage: 0}
output: {dir: %s, name: rep}
sweep:
  search:
    train.lr: {grid: [3.0e-3, 1.0e-7]}
  seeds: 2
  scheduler: {kind: asha, grace_period: 10, reduction_factor: 2}
  resources: {max_concurrent_trials: 2}
"""


def test_replicates_grouped_and_stopped_together(tmp_path: Path) -> None:
    """2 configurations x 2 seeds: one row per configuration (mean, seed SD, 2 seeds, paired over seeds); the
    configuration that learns nothing (lr 1e-7) is cut at the first rung with both its seeds."""
    spec = tmp_path / "rep.yaml"
    spec.write_text(REPLICATE_SPEC % tmp_path)
    proc = _cli("sweep", str(spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _results(tmp_path / "rep")
    assert len(rows) == 2 and all(r["n_seeds"] == "2" and r["seeds"] == "0;1" for r in rows), rows
    good, bad = rows
    assert float(good["train.lr"]) == 3.0e-3 and good["full_budget"] == "True" and int(good["steps"]) == 30
    assert float(good["seed_sd"]) > 0 and len(good["per_seed"].split(";")) == 2
    # the bad configuration was cut on its seeds' mean at the first rung: the seed whose report completed the pair
    # stopped there; one that had run ahead alone stops at its next report (or had finished: a 30-step trial is
    # quick), and the configuration is compared at the last step both seeds reached, against the best at that step
    ends = {}
    for tid in bad["trials"].split(";"):
        tdir = next((tmp_path / "rep").glob(f"{tid}-*"))
        ends[tid] = max(int(json.loads(line)["step"]) for line in (tdir / "result.json").read_text().splitlines())
    assert bad["stopped_early"] == "True" and bad["full_budget"] == "False" and min(ends.values()) == 10, ends
    assert int(bad["diff_at_step"]) == int(bad["step"]) == 10 and bad["seeds_paired"] == "2", bad
    assert bad["rank"] == "2" and float(bad["diff_to_best"]) > 0.5 and bad["tied"] == "False", bad
    assert "over 2 paired seeds" in proc.stdout


RESUME_SPEC = """
model: {family: mdlm, size: null, d_model: 64, n_layers: 2, n_heads: 2, cond_dim: 16}
diffusion: {sample_steps: 4}
data: {source: builtin, seq_len: 64, max_documents: 300}
train: {max_steps: 60, micro_batch_size: 16, lr: 3.0e-3, warmup_steps: 2, eval_every: 10, checkpoint_every: 10,
        log_every: 5, num_samples: 1, eval_samples: 2, eval_at_start: true}
scaling: {num_workers: 1, device: cpu, zero_stage: 0}
output: {dir: %s, name: r}
sweep:
  search:
    diffusion.schedule: {grid: [loglinear, linear, cosine]}
  scheduler: {kind: none}
  resources: {max_concurrent_trials: 1}
"""


def _steps(trial_dir: Path) -> list[int]:
    rows = []
    for line in (trial_dir / "result.json").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [int(r["step"]) for r in rows if "step" in r]


def test_resume_after_sigkill(tmp_path: Path) -> None:
    spec = tmp_path / "resume.yaml"
    spec.write_text(RESUME_SPEC % tmp_path)
    sweep_dir = tmp_path / "r"
    runtime = Path(tempfile.mkdtemp(prefix="dls", dir="/tmp"))  # this driver's private Ray lives below it
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "DIFFLM_RUNTIME_DIR": str(runtime)},
    )
    # Kill once one trial has finished and the next has checkpointed (so it must continue, not restart).
    # Tune writes a running trial's result.json lazily; the Train run's checkpoint folders appear at once.
    def state() -> tuple[list[str], list[str]]:
        done, partial = [], []
        for d in sweep_dir.glob("*-schedule=*"):
            s = _steps(d) if (d / "result.json").exists() else []
            if s and s[-1] == 60:
                done.append(d.name)
            elif any((d / "train").glob("checkpoint_*")):
                partial.append(d.name)
        return done, partial

    deadline = time.time() + 400
    while time.time() < deadline:
        finished, partial = state()
        if finished and partial:
            break
        time.sleep(0.1)
    else:
        driver.kill()
        pytest.fail(f"sweep did not reach the kill point: {state()}")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished, partial = state()
    # The killed driver's private Ray instance goes with it (its watchdog); never kill Ray processes by name
    # here: other Ray instances on the machine are not this test's.
    left = processes_under(runtime)
    for _ in range(60):
        if not left:
            break
        time.sleep(0.5)
        left = processes_under(runtime)
    stop_processes(left)
    subprocess.run(["rm", "-rf", str(runtime)], check=False)
    assert not left, [p.pid for p in left]
    assert finished and partial

    proc = _cli("sweep", str(spec), "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _results(sweep_dir)
    assert len(rows) == 3 and all(r["status"] == "TERMINATED" and r["steps"] == "60" for r in rows), rows
    for name in finished:  # never run again
        assert len((sweep_dir / name / "starts.log").read_text().split()) == 1
    for name in partial:  # restarted once, continued from its checkpoint instead of step 0
        assert len((sweep_dir / name / "starts.log").read_text().split()) == 2
        # TensorBoard keeps both sessions: a restart from scratch would log the step-0 eval twice.
        acc = EventAccumulator(str(sweep_dir / name / "tensorboard"), purge_orphaned_data=False).Reload()
        val_steps = [e.step for e in acc.Scalars("val/nll")]
        assert val_steps.count(0) == 1 and val_steps[-1] == 60, val_steps
        assert _steps(sweep_dir / name)[-1] == 60


OPTUNA_SPEC = """
model: {family: mdlm, size: null, d_model: 32, n_layers: 1, n_heads: 2, cond_dim: 16}
diffusion: {sample_steps: 4}
data: {source: builtin, seq_len: 32, max_documents: 300}
train: {max_steps: 20, micro_batch_size: 8, warmup_steps: 2, eval_every: 10, checkpoint_every: 20, log_every: 5,
        num_samples: 1, eval_samples: 2}
scaling: {num_workers: 1, device: cpu, zero_stage: 0}
output: {dir: %s, name: o}
sweep:
  search:
    train.lr: {loguniform: [1.0e-3, 5.0e-3]}
    diffusion.schedule: {choice: [loglinear, cosine]}
    train.checkpoint_every: {qrandint: [10, 30, 5]}
  algorithm: optuna
  num_samples: 5
  seed: 3
  scheduler: {kind: none}
"""


def test_optuna_honours_space_and_bad_samples_fail_alone(tmp_path: Path) -> None:
    spec = tmp_path / "optuna.yaml"
    spec.write_text(OPTUNA_SPEC % tmp_path)
    proc = _cli("sweep", str(spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _results(tmp_path / "o")
    assert len(rows) == 5
    for r in rows:
        assert 1e-3 <= float(r["train.lr"]) <= 5e-3
        assert r["diffusion.schedule"] in ("loglinear", "cosine")
        ce = int(r["train.checkpoint_every"])
        assert ce in (10, 15, 20, 25, 30)
        if ce % 10:  # the run spec rejects it: that trial fails at once with the pydantic message
            assert r["status"] == "FAILED" and "must be a multiple of eval_every" in r["error"], r
            assert r["steps"] == "0"
        else:
            assert r["status"] == "TERMINATED" and r["steps"] == "20", r
    assert any(r["status"] == "FAILED" for r in rows) and any(r["status"] == "TERMINATED" for r in rows)


IN_TRIAL_SPEC = """
model: {family: mdlm, size: null, d_model: 32, n_layers: 1, n_heads: 2, cond_dim: 16}
diffusion: {sample_steps: 4}
data: {source: builtin, seq_len: 32, max_documents: 300}
train: {max_steps: 200, micro_batch_size: 8, lr: 3.0e-3, warmup_steps: 2, eval_every: 20, checkpoint_every: 20,
        log_every: 10, num_samples: 0, eval_samples: 2, eval_at_start: false}
scaling: {num_workers: 1, device: cpu, cpus_per_worker: 1, zero_stage: 2}
output: {dir: %s, name: t}
"""


def test_in_trial_runs_match_ray_train_and_survive_a_killed_trial(tmp_path: Path) -> None:
    """Two identical one-worker trials train in their Tune actors (no Ray Train processes); one actor is
    SIGKILLed after a checkpoint. Tune restarts that trial, which continues from its checkpoint, and both end
    with the weights a `difflm train` (Ray Train worker, DeepSpeed) of the same spec has, bit for bit."""
    from safetensors.torch import load_file

    run_spec = tmp_path / "run.yaml"
    run_spec.write_text(IN_TRIAL_SPEC % tmp_path)
    sweep_spec = tmp_path / "sweep.yaml"
    sweep_spec.write_text(IN_TRIAL_SPEC % tmp_path + """sweep:
  search:
    diffusion.schedule: {grid: [loglinear]}
  num_samples: 2
  scheduler: {kind: none}
  max_failures: 1
""")
    sweep_dir = tmp_path / "t"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(sweep_spec)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.time() + 300, None
    while killed is None and time.time() < deadline and driver.poll() is None:
        for d in sweep_dir.glob("*-schedule=*"):
            ckpts = list((d / "train").glob("checkpoint_*"))
            if ckpts and not (d / "train" / "checkpoint_00000200").exists():
                pid = int((d / "starts.log").read_text().split()[0])  # the trial actor: it trains, no worker below it
                os.kill(pid, signal.SIGKILL)
                killed = d
                break
        time.sleep(0.02)
    out, _ = driver.communicate(timeout=400)
    assert driver.returncode == 0 and killed is not None, out[-3000:]
    assert "RayTrainWorker" not in out
    trials = sorted(sweep_dir.glob("*-schedule=*"))  # results.csv has one row per configuration: both are one
    assert len(trials) == 2 and all(_last_step(d) == 200 for d in trials), [(d.name, _last_step(d)) for d in trials]
    assert len(_results(sweep_dir)) == 1
    assert len((killed / "starts.log").read_text().split()) == 2  # Tune restarted it
    acc = EventAccumulator(str(killed / "tensorboard"), purge_orphaned_data=False).Reload()
    steps = [e.step for e in acc.Scalars("val/nll")]
    assert steps[0] == 20 and steps[-1] == 200 and len(steps) < 2 * 10, steps  # continued, not from step 0
    # its first reported row: step 20's, or the restarted attempt's first when the kill beat step 20's report
    first = min(result_rows(killed), key=lambda r: r["step"])
    assert first["startup/first_step_s"] < 30 and not (killed / "train" / "checkpoint_manager_snapshot.json").exists()

    # the reference is a Ray Train run (a one-worker `difflm train` would otherwise run without Ray)
    proc = _cli("train", str(run_spec), "--output", str(tmp_path / "ray"), "--name", "r", "--set", "scaling.launcher=ray")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worker process: started" not in proc.stderr  # it did run under Ray Train
    ref = load_file(str(tmp_path / "ray" / "r" / "checkpoints" / "last" / "model.safetensors"))
    # and the default one-worker `difflm train` (one local worker process, orchestrator.local) ends the same
    proc = _cli("train", str(run_spec), "--output", str(tmp_path / "local"), "--name", "l")
    assert proc.returncode == 0 and "worker process: started" in proc.stderr, proc.stdout + proc.stderr
    got = load_file(str(tmp_path / "local" / "l" / "checkpoints" / "last" / "model.safetensors"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    for d in trials:
        got = load_file(str(d / "train" / "checkpoints" / "last" / "model.safetensors"))
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), d
