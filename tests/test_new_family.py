"""`difflm new-family NAME`: bad names exit 2 with one line; a scaffold (into a temp folder, never the repo)
imports, registers, validates as a run spec section and passes the whole family contract in process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from difflm.families import family_names, registry
from orchestrator.cli import main
from orchestrator.spec.run import RunSpec
from tests import test_family_contract as contract


@pytest.fixture
def scaffolded(tmp_path: Path) -> Iterator[str]:
    """`difflm new-family scaffolded_lm --into TMP`, imported from TMP; unregistered afterwards."""
    name = "scaffolded_lm"
    res = CliRunner().invoke(main, ["new-family", name, "--into", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["__init__.py", "config.py", "model.py", "samplers.py"]
    sys.path.insert(0, str(tmp_path))
    try:
        __import__(name)
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]
        registry._REGISTRY.pop(name, None)
        registry.registry_changed()


def test_bad_names_exit_2_with_one_line(tmp_path: Path) -> None:
    for bad, says in (("1abc", "not a valid family name"), ("My-Family", "not a valid family name"),
                      ("class", "not a valid family name"), ("mdlm", "already registered"),
                      ("base", "already exists")):
        into = [] if bad == "base" else ["--into", str(tmp_path)]  # base: difflm/families/base.py is taken
        res = CliRunner().invoke(main, ["new-family", bad, *into])
        assert res.exit_code == 2 and says in res.output and res.output.count("\n") == 1, (bad, res.output)
    assert list(tmp_path.iterdir()) == []


def test_scaffold_registers_and_passes_the_family_contract(scaffolded: str, tmp_path: Path) -> None:
    assert scaffolded in family_names()
    spec = RunSpec.model_validate({"model": {"family": scaffolded, "size": "tiny"}, "diffusion": {"sample_steps": 4}})
    assert type(spec.diffusion).__name__ == "ScaffoldedLmConfig"
    with pytest.raises(ValueError, match="graph"):  # a field the scaffold does not read is an unknown key
        RunSpec.model_validate({"model": {"family": scaffolded}, "diffusion": {"graph": "uniform"}})
    contract.check_memorises_a_batch(scaffolded)
    contract.check_padding_ignored(scaffolded)
    contract.check_val_invariance(scaffolded)
    for sampler in ("reveal",):
        contract.check_sampler(scaffolded, sampler)
    contract.check_checkpoint_round_trip(scaffolded, tmp_path)


def test_in_tree_registration_adds_one_import_before_build_model(tmp_path: Path) -> None:
    """Without --into the package goes to difflm/families/ and its import into the package's __init__ (here: a copy)."""
    from orchestrator.cli.scaffold import _register_in_tree

    import difflm.families

    original = Path(difflm.families.__file__).read_text()
    (tmp_path / "__init__.py").write_text(original)
    _register_in_tree("my_lm", tmp_path)
    text = (tmp_path / "__init__.py").read_text()
    line = "from difflm.families import my_lm  # noqa: E402,F401  isort: skip  (difflm new-family)\n"
    assert text.replace(line, "") == original and text.index(line) < text.index("def build_model(")
    compile(text, "__init__.py", "exec")
