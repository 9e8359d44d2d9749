"""How a difflm driver gets its Ray: a private instance on this machine, or an existing cluster.

- Private (no ``--address``): :func:`orchestrator.cluster.private.start_private_ray`, which
  makes sure the instance does not outlive the driver.
- Cluster (``--address auto|HOST:PORT``): the project's own packages (``difflm``,
  ``orchestrator``) travel to every worker through Ray's runtime_env ``py_modules``, so a
  worker node needs only the dependencies, never a checkout; the token of a
  token-authenticated cluster is picked up the way Ray does it for ``auto`` (see
  docs/scaling.md), and a refused connection becomes one line that says what to fix.

Either way the driver and its workers are *pinned* to their cluster for Ray's state API
(``RAY_API_SERVER_ADDRESS`` for a private instance, ``RAY_ADDRESS`` on a cluster). Without
that, state-API calls made inside Ray (Ray Train's placement-group cleaner, which frees the
CPUs of a trial ASHA stopped) look for "the" local Ray instance: with two on a machine they
fail, and they follow ``/tmp/ray/ray_current_cluster``, i.e. the last ``ray start`` of anyone,
to a cluster that is not theirs.

After joining, :func:`check_shared_storage` refuses relative output/cache paths on a
multi-node cluster: every node must see the same folders at the same path.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from orchestrator.errors import SpecError


def project_modules() -> list[str]:
    """Folders of the packages a worker must import: this checkout's, not whatever a node has installed."""
    import difflm
    import orchestrator

    return [str(Path(m.__file__).parent) for m in (difflm, orchestrator)]


def _with_env(kwargs: dict[str, Any], env: dict[str, str], ship_code: bool) -> dict[str, Any]:
    """``kwargs`` with ``env`` added to the runtime_env's env_vars (every worker and actor of the job, detached
    ones it creates included; not this process: a later ``ray.init`` here must not follow RAY_ADDRESS), and the
    project code."""
    runtime_env = dict(kwargs.get("runtime_env") or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    if ship_code:
        runtime_env["py_modules"] = [*runtime_env.get("py_modules", []), *project_modules()]
        runtime_env["excludes"] = [*runtime_env.get("excludes", []), "__pycache__", "*.pyc"]
    return {**kwargs, "runtime_env": runtime_env}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _enable_token_auth_if_available() -> None:
    """Use token authentication when this machine has a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) and RAY_AUTH_MODE is unset: Ray does this for ``auto`` but not for HOST:PORT, where
    a token cluster then refuses the driver. A token sent to a cluster without authentication is ignored."""
    from orchestrator.raycompat import enable_token_auth_if_available

    try:
        enable_token_auth_if_available()
    except ImportError:  # a Ray without token authentication
        return


def _auth_refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _no_cluster(address: str, exc: BaseException) -> SpecError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    return SpecError(
        f"no Ray cluster answers at {address} ({reason}); start one with `difflm cluster up` (or `ray start "
        "--head`), or leave out --address to use a private Ray instance"
    )


#: seconds to wait for the cluster's GCS port to accept a connection
PROBE_TIMEOUT_S = 5.0


def resolve_address(address: str) -> str:
    """HOST:PORT of the cluster's GCS (``auto``: the last ``ray start`` on this machine); SpecError if none."""
    from orchestrator.raycompat import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise _no_cluster(address, exc) from None
    if resolved is None:
        raise _no_cluster(address, ConnectionError("nothing found"))
    # ray.init retries a GCS that is not there for minutes, printing a warning every few seconds: a typo
    # in the address must fail at once instead.
    host, _, port = resolved.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise _no_cluster(address, ConnectionError(f"{resolved}: {exc}")) from None
    return resolved


def connect(address: str, init: Callable[..., Any], kwargs: dict[str, Any], ship_code: bool = True) -> str:
    """``init(address=...)`` pinned to that cluster, the project code shipped to workers unless ``ship_code`` is
    off (status only reads); SpecError when the cluster refuses this driver or is not there. Returns HOST:PORT."""
    _enable_token_auth_if_available()
    gcs = resolve_address(address)
    kwargs = _with_env(kwargs, {"RAY_ADDRESS": gcs}, ship_code)
    try:
        init(address=gcs, **kwargs)
    except Exception as exc:
        if _auth_refused(exc):
            raise SpecError(
                f"the Ray cluster at {address} refused this driver's authentication token: it uses token "
                "authentication and this machine has no token or another one; copy the head's token (`ray "
                "get-auth-token` on the head prints it) to ~/.ray/auth_token here or export RAY_AUTH_TOKEN, and "
                "export RAY_AUTH_MODE=token"
            ) from None
        if isinstance(exc, ConnectionError):
            raise _no_cluster(address, exc) from None
        raise
    return gcs


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start_or_join(
    address: str | None, init: Callable[..., Any], kwargs: dict[str, Any], log: Callable[[str], None] | None = None
) -> None:
    """Start a private Ray instance (``address`` None) or join the cluster at ``address``."""
    if address is not None:
        connect(address, init, kwargs)
        return
    from orchestrator.cluster.private import start_private_ray

    if not kwargs.get("include_dashboard", True):  # no dashboard, no state API to pin
        start_private_ray(init, kwargs, log or _stderr)
        return
    # The dashboard serves the state API; choosing its port makes its URL known before Ray starts, so
    # every worker of the instance (runtime_env) asks its own dashboard, never another Ray's.
    for attempt in range(3):
        port = free_port()
        pinned = _with_env(kwargs, {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}, ship_code=False)
        try:
            start_private_ray(init, {**pinned, "dashboard_port": port}, log or _stderr)
            return
        except Exception as exc:  # the free port was taken in between: another Ray started on this machine
            if "valid port for dashboard" not in str(exc) or attempt == 2:
                raise
            import ray

            ray.shutdown()


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_storage(fields: dict[str, str], n_nodes: int) -> None:
    """SpecError when a multi-node cluster would get paths only this machine can resolve.

    ``fields`` maps spec fields (``output.dir``, ``data.cache_dir``) to their values as written.
    Workers on other nodes write checkpoints and TensorBoard under ``output.dir`` and read the
    tokenized data from ``data.cache_dir``; a relative path means "below wherever the driver
    runs", which no other node has.
    """
    if n_nodes <= 1:
        return
    bad = [k for k, v in fields.items() if not Path(os.path.expanduser(v)).is_absolute()]
    if bad:
        listing = ", ".join(f"{k}: {fields[k]!r}" for k in bad)
        raise SpecError(
            f"the cluster has {n_nodes} nodes but {listing} {'is a relative path' if len(bad) == 1 else 'are relative paths'}: "
            f"every node must see the same folder at the same absolute path; set {' and '.join(bad)} to a shared "
            "filesystem (NFS or similar) mounted at the same path on every node, e.g. "
            + " ".join(f"--set {k}=/shared/difflm/{'runs' if k.startswith('output') else 'cache'}" for k in bad)
        )
