"""pyproject.toml says what difflm needs at run time, in the form today's setuptools reads without warnings."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_runtime_import_is_a_declared_dependency() -> None:
    """A module difflm/ or orchestrator/ imports must come with `pip install difflm`, not only with the
    test extra (psutil was in `test` only, though orchestrator.cluster imports it)."""
    imported: set[str] = set()
    for f in [*REPO.glob("difflm/**/*.py"), *REPO.glob("orchestrator/**/*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    imported -= set(sys.stdlib_module_names) | {"difflm", "orchestrator", "__future__"}
    declared = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
    # a feature extra (e.g. `eval`: lm-eval, mauve-text) declares what its lazily imported commands need;
    # the `test` extra does not count: `pip install difflm` never installs it
    extras = {_dist_name(r) for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()
              if name != "test" for r in reqs}
    dists = md.packages_distributions()
    missing = sorted(m for m in imported
                     if not {d.lower().replace("_", "-") for d in dists.get(m, [m])} & (declared | extras))
    assert not missing, f"imported at run time but not in project.dependencies or a feature extra: {missing}"
    assert "psutil" in imported and "psutil" in declared


def test_license_is_an_spdx_string_setuptools_reads_without_warning() -> None:
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    floor = [r for r in PYPROJECT["build-system"]["requires"] if _dist_name(r) == "setuptools"]
    assert floor and tuple(int(x) for x in re.findall(r">=\s*([\d.]+)", floor[0])[0].split(".")) >= (77,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the table form raised SetuptoolsDeprecationWarning here
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"
