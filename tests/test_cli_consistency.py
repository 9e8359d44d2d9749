"""One shape across commands: --output/--name on sweep, --profile on resume, one meaning of --steps per
command family, bench's precision default, bench sampling's options in --help, the summary's perplexity
wording, --debug tracebacks, and the sweep resume guard (all without Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.cli.common import DENOISE_STEPS_HELP, TRAIN_STEPS_HELP

REPO = Path(__file__).resolve().parents[1]


def _option(path: list[str], name: str) -> click.Option:
    cmd: Any = main
    for p in path:
        cmd = cmd.commands[p]
    (opt,) = [p for p in cmd.params if p.name == name]
    return opt


def test_steps_means_one_thing_per_command_family() -> None:
    for path in (["sample"], ["denoise"], ["bench", "sampling"]):
        assert DENOISE_STEPS_HELP in (_option(path, "steps").help or ""), path
    for path in ([], ["throughput"]):
        cmd: Any = main.commands["bench"]
        for p in path:
            cmd = cmd.commands[p]
        (steps,) = [p for p in cmd.params if p.name == "steps"]
        assert TRAIN_STEPS_HELP in (steps.help or "") and DENOISE_STEPS_HELP not in (steps.help or "")


def test_bench_precision_defaults_to_what_train_resolves() -> None:
    from orchestrator.spec.run import TrainConfig

    assert _option(["bench"], "precision").default == "auto" == TrainConfig().precision
    assert _option(["bench", "throughput"], "precision").default == "auto"


def test_bench_sampling_lists_its_options_in_help(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["bench", "sampling", "--help"])
    assert res.exit_code == 0
    for opt in ("--steps", "--length", "--num", "--repeats", "--seed", "--device", "--threads", "RUN_OR_CHECKPOINT"):
        assert opt in res.output
    bad = CliRunner().invoke(main, ["bench", "sampling", str(tmp_path), "--steps", "0"])
    assert bad.exit_code == 2 and "--steps" in bad.output
    missing = CliRunner().invoke(main, ["bench", "sampling", str(tmp_path / "nope"), "--device", "cpu"])
    assert missing.exit_code == 2 and missing.output.startswith("error: ")


def _summary_lines(exact: bool | None) -> list[str]:
    from orchestrator.cli.train import _print_summary

    s: dict[str, Any] = {"steps": 10, "best_val_nll": 2.0}
    if exact is not None:
        s["exact_likelihood"] = exact
    result = SimpleNamespace(summary=s, best_checkpoint="b", last_checkpoint="l", run_dir="r")
    out: list[str] = []
    import orchestrator.cli.train as t

    orig = t.click.echo
    t.click.echo = lambda text="", **kw: out.append(str(text))  # type: ignore[assignment]
    try:
        _print_summary(result)
    finally:
        t.click.echo = orig  # type: ignore[assignment]
    return [ln.strip() for ln in out[0].splitlines()]


def test_summary_says_exact_perplexity_for_ar_and_a_bound_otherwise() -> None:
    ar = _summary_lines(True)
    assert "perplexity      7.389 (exact)" in ar and not any("<=" in ln for ln in ar)
    for lines in (_summary_lines(False), _summary_lines(None)):
        assert "perplexity <=   7.389" in lines
        assert any(ln.startswith("best val NLL") and ln.endswith("an upper bound") for ln in lines)


def _write_sweep(tmp_path: Path, lr: float = 3e-3) -> Path:
    raw = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
    raw["train"]["lr"] = lr
    f = tmp_path / "qs.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_sweep_output_and_name_set_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.cli.sweep as cli_sweep
    import orchestrator.sweep.driver as driver

    seen: dict[str, Any] = {}

    def fake_run_sweep(sweep: Any, spec_path: str, **kw: Any) -> float:
        seen["dir"] = driver.sweep_dir_for(sweep, spec_path)
        return 0.0

    monkeypatch.setattr(driver, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(cli_sweep, "_finish", lambda d: True)
    f = _write_sweep(tmp_path)
    res = CliRunner().invoke(main, ["sweep", str(f), "--output", str(tmp_path / "out"), "--name", "mine"])
    assert res.exit_code == 0, res.output
    assert seen["dir"] == (tmp_path / "out" / "mine").resolve()
    assert "--set output.name=" not in (REPO / "Makefile").read_text()


def test_sweep_resume_refuses_a_changed_sweep_file(tmp_path: Path) -> None:
    from orchestrator.errors import SpecError
    from orchestrator.rundir.run_folder import SWEEP_STATE
    from orchestrator.spec.yamlio import spec_yaml
    from orchestrator.sweep.driver import check_sweep_unchanged
    from orchestrator.sweep.spec import load_sweep_file

    f = _write_sweep(tmp_path)
    sweep_dir = tmp_path / "out" / "qs"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text(spec_yaml(load_sweep_file(str(f), ("output.name=qs",))))
    (sweep_dir / SWEEP_STATE).write_text(json.dumps({"spec_path": str(f), "overrides": [], "profile": None}))
    before = (sweep_dir / "sweep.yaml").read_text()
    # the same sweep (its folder given another way, a longer cadence) resumes
    check_sweep_unchanged(
        sweep_dir, load_sweep_file(str(f), (f"output.dir={tmp_path / 'out'}", "output.name=qs", "train.eval_every=5"))
    )
    f2 = _write_sweep(tmp_path, lr=1e-2)
    res = CliRunner().invoke(main, ["sweep", str(f2), "--output", str(tmp_path / "out"), "--name", "qs", "--resume"])
    assert res.exit_code == 2
    assert "train.lr: 0.003 -> 0.01" in res.output and "--allow-spec-change" in res.output
    assert (sweep_dir / "sweep.yaml").read_text() == before  # not overwritten
    with pytest.raises(SpecError, match="--allow-spec-change"):
        check_sweep_unchanged(sweep_dir, load_sweep_file(str(f2), ()))


def test_resume_takes_a_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.cli.sweep as cli_sweep
    import orchestrator.cli.train as cli_train
    from orchestrator.rundir.run_folder import SWEEP_STATE
    from orchestrator.spec.run import RunSpec

    launched: list[Any] = []
    monkeypatch.setattr(cli_train, "_launch", lambda spec, address, **kw: launched.append((spec, kw)))
    run = tmp_path / "run"
    run.mkdir()
    saved = RunSpec.model_validate({"scaling": {"device": "cpu", "num_workers": 1}}).model_dump(mode="json")
    (run / "spec.yaml").write_text(yaml.safe_dump(saved))
    res = CliRunner().invoke(main, ["resume", str(run), "--profile", "cpu", "--allow-spec-change"])
    assert res.exit_code == 0, res.output
    spec, kw = launched[0]
    assert spec.scaling.num_workers == 2 and spec.scaling.deepspeed is True  # clusters/cpu.yaml over spec.yaml
    assert kw["allow_spec_change"] is True and "profile" in kw["note"]
    # --set still wins over the profile
    res = CliRunner().invoke(main, ["resume", str(run), "--profile", "cpu", "--set", "scaling.num_workers=3"])
    assert res.exit_code == 0 and launched[1][0].scaling.num_workers == 3
    # a sweep folder: the profile replaces the one the sweep started with
    runs: list[tuple[Any, ...]] = []
    monkeypatch.setattr(cli_sweep, "_run", lambda *a: runs.append(a))
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    (sweep_dir / SWEEP_STATE).write_text(json.dumps({"spec_path": "x.yaml", "overrides": [], "profile": "laptop-mps"}))
    res = CliRunner().invoke(main, ["resume", str(sweep_dir), "--profile", "cpu", "--allow-spec-change"])
    assert res.exit_code == 0, res.output
    assert runs[0][4] == "cpu" and runs[0][5] is True


@pytest.mark.parametrize("how", ["plain", "flag", "group-flag", "env"])
def test_debug_shows_the_driver_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    import orchestrator.train.launch

    def fake_launch(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom in the driver")

    monkeypatch.setattr(orchestrator.train.launch, "launch_train", fake_launch)
    monkeypatch.setenv("DIFFLM_DEBUG", "0")  # off; restored (unset) after the test, which --debug sets
    spec = tmp_path / "s.yaml"
    spec.write_text("scaling: {device: cpu}\n")
    args = ["train", str(spec), "--output", str(tmp_path)]
    env = {}
    if how == "flag":
        args.append("--debug")
    elif how == "group-flag":
        args.insert(0, "--debug")
    elif how == "env":
        env["DIFFLM_DEBUG"] = "1"
    res = CliRunner().invoke(main, args, env=env)
    assert res.exit_code == 1
    assert res.output.rstrip().splitlines()[-1].startswith("error: training failed: RuntimeError: boom in the driver")
    if how == "plain":
        assert "Traceback" not in res.output and "--debug or DIFFLM_DEBUG=1" in res.output
        assert len(res.output.strip().splitlines()) == 1
    else:
        assert "Traceback (most recent call last)" in res.output and "fake_launch" in res.output


def test_eval_lines_say_ppl_for_ar_and_a_bound_otherwise() -> None:
    import io

    from orchestrator.train.console import TrainConsole

    out = io.StringIO()
    console = TrainConsole(stream=out)
    payload = {"step": 3, "val/nll": 2.0, "val/best_nll": 2.0, "val/ppl": 7.389}
    console.handle("eval", {**payload, "exact_likelihood": True})
    console.handle("eval", {**payload, "exact_likelihood": False})
    ar, mdlm = out.getvalue().strip().splitlines()
    assert "  ppl 7.389  " in ar and "ppl<=" not in ar
    assert "  ppl<= 7.389  " in mdlm
