"""Lean Ray Train start-up: the helper actors build_trainer leaves out, `cpus_per_worker: auto`, and resuming a spec with auto fields (no Ray instance needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.spec.run import RunSpec
from orchestrator.train.trainer import build_trainer


def _callback_names(tmp_path: Path, pg_cleaner: bool) -> set[str]:
    spec = RunSpec.model_validate({"scaling": {"device": "cpu", "cpus_per_worker": 2}})
    trainer = build_trainer(spec, "cpu", tmp_path / "data", tmp_path / "run", tmp_path / "tb", queue=None,
                            pg_cleaner=pg_cleaner)
    assert trainer.scaling_config.resources_per_worker == {"CPU": 2}
    return {type(cb).__name__ for cb in trainer._create_default_callbacks()}


def test_no_ray_data_actor_and_no_cleaner_on_a_lone_private_ray(tmp_path: Path) -> None:
    kept = _callback_names(tmp_path, pg_cleaner=True)
    lone = _callback_names(tmp_path, pg_cleaner=False)
    # Ray Train's own callbacks that do the work stay (backend: the process group; accelerator setup)
    assert {"BackendSetupCallback", "AcceleratorSetupCallback"} <= kept
    assert "DatasetsCallback" not in kept | lone  # it started a DatasetManager actor with no datasets
    assert "PlacementGroupCleanerCallback" in kept  # sweeps and clusters keep Ray's cleaner
    assert lone == kept - {"PlacementGroupCleanerCallback"}


def test_auto_cpus_per_worker_shares_the_nodes_whole() -> None:
    from orchestrator.train.startup import auto_cpus_per_worker

    assert auto_cpus_per_worker(1, [2.0]) == 2  # a lone run on a 2-core box: both cores (was 1)
    assert auto_cpus_per_worker(2, [2.0]) == 1
    assert auto_cpus_per_worker(3, [16.0]) == 5
    assert auto_cpus_per_worker(2, [6.0, 2.0]) == 3  # never 4: the 2-CPU node cannot hold a 4-CPU worker
    assert auto_cpus_per_worker(4, [8.0, 8.0]) == 4
    assert auto_cpus_per_worker(4, [2.0]) == 1  # more workers than CPUs: check_resources says so later


def test_resume_with_auto_matches_the_resolved_spec() -> None:
    from orchestrator.rundir.run_folder import spec_differences

    saved = {"train": {"precision": "fp32", "lr": 1e-3}, "scaling": {"cpus_per_worker": 2.0}}
    again = {"train": {"precision": "auto", "lr": 1e-3}, "scaling": {"cpus_per_worker": "auto"}}
    assert spec_differences(saved, again) == []
    changed = {"train": {"precision": "bf16", "lr": 1e-3}, "scaling": {"cpus_per_worker": 1.0}}
    assert spec_differences(saved, changed) == [
        "scaling.cpus_per_worker: 2.0 -> 1.0", "train.precision: 'fp32' -> 'bf16'"
    ]


def test_resolve_cpus_replaces_only_auto_and_says_so() -> None:
    from orchestrator.train.startup import resolve_cpus

    said: list[str] = []
    auto = RunSpec.model_validate({"scaling": {"num_workers": 2}})
    assert resolve_cpus(auto, [6.0, 2.0], said.append).scaling.cpus_per_worker == 3.0
    assert said == ["cpus_per_worker 3 (auto: 2 worker(s), 8 CPUs)"]
    fixed = RunSpec.model_validate({"scaling": {"cpus_per_worker": 1}})
    assert resolve_cpus(fixed, [6.0], said.append) is fixed and len(said) == 1


def test_cpus_per_worker_takes_a_positive_number_or_auto_with_one_message() -> None:
    import pytest
    from pydantic import ValidationError

    assert RunSpec.model_validate({"scaling": {"cpus_per_worker": "1.5"}}).scaling.cpus_per_worker == 1.5
    assert RunSpec.model_validate({}).scaling.cpus_per_worker == "auto"
    for bad in (0, -1, "abc", True, float("nan")):
        with pytest.raises(ValidationError) as err:
            RunSpec.model_validate({"scaling": {"cpus_per_worker": bad}})
        assert err.value.error_count() == 1
        assert "must be a number of CPUs above 0 or 'auto'" in str(err.value)


def test_a_deepspeed_cpu_op_still_to_compile_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker announces DeepSpeed's ~30 s first-use compile of its CPU comm op; once the module is in
    the extensions folder there is nothing to announce."""
    from orchestrator.train.engine import deepspeed_cpu_op_notice, deepspeed_cpu_op_pending

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert deepspeed_cpu_op_pending() == tmp_path / "deepspeed_shm_comm"  # the folder the console names
    assert f"kept in {tmp_path / 'deepspeed_shm_comm'})" in (deepspeed_cpu_op_notice() or "")
    built = tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    built.parent.mkdir(exist_ok=True)
    built.write_bytes(b"")
    assert deepspeed_cpu_op_pending() is None and deepspeed_cpu_op_notice() is None


def test_each_environment_gets_its_own_extensions_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two venvs of one checkout shared ~/.cache/torch_extensions/py311_cpu: each rebuilt DeepSpeed's comm op
    after the other ran (69-70 s), silently, because the .so existed. The folder is keyed by environment,
    and a build another environment made does not silence this one's first-compile notice."""
    import sys

    from orchestrator.train import engine

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.get_default_build_root", lambda: str(tmp_path))
    here = engine.keyed_extensions_dir()
    assert here.parent == tmp_path and here.name.startswith("difflm-py") and here == engine.keyed_extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/elsewhere/venv2")
    other = engine.keyed_extensions_dir()
    assert other != here and other.parent == tmp_path
    # the other environment has built its op; this one still has to, and says so
    (other / "deepspeed_shm_comm").mkdir(parents=True)
    (other / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    monkeypatch.setattr(sys, "prefix", sys.base_prefix if sys.base_prefix != "/elsewhere/venv2" else "/x")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    pending = engine.deepspeed_cpu_op_pending()
    assert pending is not None and pending.parent != other and pending.parent.parent == tmp_path
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(pending.parent)
    # a folder the user chose wins
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert engine.use_keyed_extensions_dir() == tmp_path / "mine"
