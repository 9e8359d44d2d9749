"""The parts of `difflm cluster` and of joining a cluster that need no Ray: status rendering, job labels,
the shared-storage check, the auth-refusal detection and the node records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.cluster.connect import _auth_refused, check_shared_storage
from orchestrator.cluster.nodes import NodeRecord, _arg, load_records, records_dir
from orchestrator.cluster.status import NodeView, job_label, render
from orchestrator.errors import SpecError


@pytest.mark.parametrize(
    "entrypoint,label",
    [
        ("/home/u/.venv/bin/python -m orchestrator sweep sweeps/quickstart.yaml --address auto",
         "difflm sweep sweeps/quickstart.yaml --address auto"),
        ("/home/u/.venv/bin/difflm train spec.yaml", "difflm train spec.yaml"),
        ("python my_script.py", "python my_script.py (not difflm)"),
        (None, "unknown job (not difflm)"),
    ],
)
def test_job_label(entrypoint: str | None, label: str) -> None:
    assert job_label(entrypoint) == label


def test_render_shows_use_per_node_and_work() -> None:
    head = NodeView("a" * 56, "10.0.0.1", True, {"CPU": 16.0, "GPU": 6.0}, {"CPU": 15.0, "GPU": 0.0},
                    {"difflm sweep s.yaml": Counter({"sweep trial": 3, "train worker": 6, "Ray helper": 9})})
    idle = NodeView("b" * 56, "10.0.0.2", False, {"CPU": 16.0}, {"CPU": 16.0})
    out = render([head, idle], None, "10.0.0.1:6379")
    assert out.splitlines() == [
        "Ray cluster at 10.0.0.1:6379: 2 node(s)",
        "  node aaaaaaaaaaaa  10.0.0.1  (head)  CPU 1/16  GPU 6/6",
        "    difflm sweep s.yaml: 6 train workers, 3 sweep trials, 9 Ray helpers",
        "  node bbbbbbbbbbbb  10.0.0.2  CPU 0/16  GPU 0/0",
        "    idle",
    ]
    unknown = render([idle], "what runs where is unknown: ...", "x:1")
    assert "    ?" in unknown and unknown.endswith("what runs where is unknown: ...")


def test_shared_storage_check() -> None:
    fields = {"output.dir": "runs", "data.cache_dir": "/shared/cache"}
    check_shared_storage(fields, 1)  # one node: relative paths are fine
    with pytest.raises(SpecError) as err:
        check_shared_storage(fields, 3)
    assert str(err.value).startswith("the cluster has 3 nodes but output.dir: 'runs' is a relative path")
    assert "--set output.dir=/shared/difflm/runs" in str(err.value) and "data.cache_dir" not in str(err.value).split(":")[1]
    with pytest.raises(SpecError, match="output.dir: 'runs', data.cache_dir: '.difflm_cache' are relative paths"):
        check_shared_storage({"output.dir": "runs", "data.cache_dir": ".difflm_cache"}, 2)
    check_shared_storage({"output.dir": "~/shared/runs", "data.cache_dir": "/c"}, 2)  # ~ expands to absolute


def test_auth_refusal_is_found_in_the_exception_chain() -> None:
    class AuthenticationError(Exception):
        pass

    try:
        try:
            raise AuthenticationError("RPC error: InvalidAuthToken")
        except AuthenticationError as inner:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from inner
    except ConnectionError as exc:
        assert _auth_refused(exc)
    assert not _auth_refused(ConnectionError("Failed to connect"))


def test_raylet_arguments_and_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = "/x/raylet --node_id=abc123 --session_dir=/tmp/r/session_1 --temp_dir=/tmp/r --gcs-address=10.0.0.1:6379"
    assert (_arg(cmd, "node_id"), _arg(cmd, "session_dir"), _arg(cmd, "gcs-address")) == (
        "abc123", "/tmp/r/session_1", "10.0.0.1:6379")
    assert _arg(cmd, "missing") is None
    monkeypatch.setenv("DIFFLM_RUNTIME_DIR", str(tmp_path))
    rec = NodeRecord("head", "10.0.0.1:6379", "abc123", "/tmp/r/session_1", "/tmp/r", "2026-01-01T00:00:00")
    records_dir().mkdir(parents=True)
    rec.path.write_text(json.dumps(rec.__dict__))
    (records_dir() / "broken.json").write_text("{")
    assert load_records() == [rec]


def test_an_address_where_nothing_listens_fails_at_once() -> None:
    """Not ray.init's minutes of retries against a GCS that is not there: one line, exit 2 (a SpecError)."""
    import socket
    import time

    from orchestrator.cluster.connect import resolve_address
    from orchestrator.errors import SpecError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once the with-block closes it
    start = time.monotonic()
    with pytest.raises(SpecError, match=rf"no Ray cluster answers at 127.0.0.1:{port} .*Connection refused"):
        resolve_address(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 10
