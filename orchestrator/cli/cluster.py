"""`difflm cluster up | down | status`: a Ray cluster from machines you have (docs/scaling.md).

    difflm cluster up                              # head on this machine (ray start --head)
    difflm cluster up --address 10.0.0.1:6379      # this machine joins it (ray start --address)
    difflm cluster up --config clusters/local.yaml # Ray's cluster launcher over SSH (ray up)
    difflm cluster status [--address HOST:PORT]    # nodes, resources, what each runs for difflm
    difflm cluster down [--config ...]             # stop what `up` started here (never `ray stop`)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from orchestrator.cli.common import user_errors


@click.group()
def cluster() -> None:
    """Start, inspect and stop a Ray cluster for difflm."""


@cluster.command()
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), help="A Ray cluster-launcher YAML: run `ray up` on it.")
@click.option("--address", help="Join the cluster whose head is at HOST:PORT instead of starting a head.")
@click.option("--port", type=int, default=6379, show_default=True, help="The head's port (GCS).")
@click.option("--num-cpus", type=float, help="CPUs this node offers (default: all).")
@click.option("--num-gpus", type=int, help="GPUs this node offers (default: all).")
@click.option("--temp-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/ray"), show_default=True,
              help="Ray's temp dir for this node (logs, sockets); two nodes on one machine need two.")
@click.option("--auth/--no-auth", default=True, show_default=True, help="Token authentication (RAY_AUTH_MODE=token).")
@click.option("--dashboard-port", type=int, help="The head's dashboard port (default 8265, or a free one if taken).")
@user_errors
def up(config: Path | None, address: str | None, port: int, num_cpus: float | None, num_gpus: int | None,
       temp_dir: Path, auth: bool, dashboard_port: int | None) -> None:
    """Start a head node here, join a cluster (--address), or launch one from a Ray YAML (--config)."""
    from orchestrator.cluster import nodes

    if config is not None:
        sys.exit(nodes.launcher("up", config))
    temp = str(temp_dir.expanduser().resolve())
    if address is None:
        rec, auth_line, dash = nodes.start_head(port, num_cpus, num_gpus, temp, auth, dashboard_port)
        click.echo(
            "\n".join([
                f"head node started: {rec.address} (node {rec.node_id[:12]}, Ray temp dir {temp}, "
                f"dashboard http://127.0.0.1:{dash})",
                auth_line,
                f"add a machine:  difflm cluster up --address {rec.address}",
                f"run on it:      difflm train SPEC --address {rec.address}   (or difflm sweep"
                + (", or --address auto on this machine)" if temp == "/tmp/ray" else ")"),
                "                output.dir and data.cache_dir must be absolute paths every node sees",
                f"see it:         difflm cluster status --address {rec.address}",
                "stop it:        difflm cluster down",
            ])
        )
    else:
        rec, auth_line = nodes.join(address, num_cpus, num_gpus, temp, auth)
        click.echo(f"joined {rec.address} as node {rec.node_id[:12]} (Ray temp dir {temp})\n{auth_line}")


@cluster.command()
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), help="A Ray cluster-launcher YAML: run `ray down` on it.")
@user_errors
def down(config: Path | None) -> None:
    """Stop the Ray nodes `difflm cluster up` started on this machine, and stale private instances of difflm."""
    from orchestrator.cluster import nodes
    from orchestrator.cluster.private import is_stale, list_instances, reap

    if config is not None:
        sys.exit(nodes.launcher("down", config))
    records = nodes.load_records()
    for rec, n in nodes.stop(records):
        click.echo(f"stopped {rec.role} node {rec.node_id[:12]} of {rec.address} ({n} process(es))")
    stale = [inst for inst in list_instances() if is_stale(inst)]
    for inst in stale:
        click.echo(f"stopped a stale private Ray instance of `{inst.command}` ({reap(inst)} process(es))")
    if not records and not stale:
        click.echo("nothing to stop: `difflm cluster up` started no node on this machine")


@cluster.command()
@click.option("--address", help="HOST:PORT of the cluster (default: the head `difflm cluster up` started here, else auto).")
@user_errors
def status(address: str | None) -> None:
    """Show the cluster's nodes, their CPUs/GPUs in use, and which difflm commands run on each."""
    from orchestrator.cluster.status import render_private

    if address is None:
        from orchestrator.cluster.nodes import load_records

        heads = [r for r in load_records() if r.role == "head"]
        address = heads[-1].address if heads else "auto"
    private = render_private()
    if address == "auto" and not _auto_cluster_exists():
        click.echo(private or "no Ray cluster found (start one with `difflm cluster up`) and no private difflm Ray instance")
        return
    import logging

    import ray

    from orchestrator.cluster.connect import connect
    from orchestrator.cluster.status import gather, render

    connect(address, ray.init, {"logging_level": logging.ERROR, "log_to_driver": False}, ship_code=False)
    try:
        views, note = gather()
        click.echo(render(views, note, address))
    finally:
        ray.shutdown()
    if private:
        click.echo(private)


def _auto_cluster_exists() -> bool:
    """Whether `--address auto` would find a running cluster (Ray records the latest in /tmp/ray)."""
    try:
        from orchestrator.raycompat import find_bootstrap_address

        return find_bootstrap_address() is not None
    except Exception:
        return False
