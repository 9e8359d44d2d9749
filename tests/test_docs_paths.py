"""Every repository path README.md and docs/*.md name is in git, so a fresh clone has it.

(A `.gitignore` rule once kept `sweeps/runs/` out of git while the README told users to run
`difflm train sweeps/runs/quickstart.yaml`; tests that globbed the working tree never noticed.)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _tracked() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return set(out.split())


def _named_paths(text: str, tops: set[str], files: set[str] = frozenset({"Makefile", "README.md", "pyproject.toml"})) -> set[str]:
    """Tokens that start with a tracked top-level entry: a folder followed by ``/`` (`sweeps/runs/quickstart.yaml`,
    `docs/sweeps.md`; the command `difflm` is not the folder `difflm/`) or a top-level file (`Makefile`).
    Placeholders and globs end the token (`difflm/families/<name>.py` -> `difflm/families/`)."""
    dirs = "|".join(re.escape(t) for t in sorted(tops - files, key=len, reverse=True))
    tops_files = "|".join(re.escape(t) for t in sorted(tops & files, key=len, reverse=True)) or "(?!)"
    pattern = re.compile(rf"(?<![\w./~-])((?:{dirs})(?:/[\w.-]*)+|(?:{tops_files})\b)")
    found = set()
    for m in pattern.finditer(text):
        path = m.group(1).rstrip(".")
        found.add(path)
    return found


def test_every_repo_path_named_in_the_docs_is_tracked() -> None:
    tracked = _tracked()
    dirs = {str(Path(f).parent.as_posix()) for f in tracked} | {
        "/".join(f.split("/")[:i]) for f in tracked for i in range(1, f.count("/") + 1)
    }
    tops = {f.split("/")[0] for f in tracked}
    missing = {}
    for doc in DOCS:
        for path in _named_paths(doc.read_text(), tops):
            clean = path.rstrip("/")
            if clean not in tracked and clean not in dirs:
                missing.setdefault(doc.name, []).append(path)
    assert not missing, f"paths named in the docs but not in git: {missing}"


def test_the_check_sees_the_paths_it_must() -> None:
    tops = {"sweeps", "docs", "Makefile", "difflm"}
    text = "run `difflm train sweeps/runs/quickstart.yaml`, see [x](docs/sweeps.md) and difflm/families/<name>.py; make"
    assert _named_paths(text, tops) == {"sweeps/runs/quickstart.yaml", "docs/sweeps.md", "difflm/families/"}
    assert "sweeps/runs/quickstart.yaml" in _named_paths((REPO / "README.md").read_text(), tops)
