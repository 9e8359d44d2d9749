"""build_trainer leaves out the Ray Train helper actors a difflm run has no use for (no Ray instance needed)."""

from __future__ import annotations

from pathlib import Path

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
