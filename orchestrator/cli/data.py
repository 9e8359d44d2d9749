"""`difflm data prepare` and `difflm data info`: the data preparation on its own, and what a cache holds.

    difflm data prepare sweeps/runs/quickstart.yaml --set data.source=text --set data.path=corpus/
    difflm data prepare SPEC --address HEAD:6379      # tokenize on a Ray cluster (shared data.cache_dir)
    difflm data info SPEC | CACHE_DIR

An interrupted `prepare` (Ctrl-C, a killed job) resumes from its finished chunks when run again;
`difflm train` / `difflm sweep` on the same data settings find the prepared cache and say so.
"""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.cli.common import user_errors


@click.group()
def data() -> None:
    """Prepare a spec's data ahead of training, or inspect a data cache."""


@data.command()
@click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec field, e.g. data.num_proc=4.")
@click.option("--address", help="Tokenize on this Ray cluster with Ray Data (data.cache_dir must be a shared folder).")
@user_errors
def prepare(spec_file: Path, overrides: tuple[str, ...], address: str | None) -> None:
    """Stream, split, tokenize and pack the data of SPEC_FILE (a run spec or a sweep file) into its cache."""
    from orchestrator.data.prepare import load_data_settings, run_prepare

    data_cfg, tok = load_data_settings(spec_file, overrides)
    prepared = run_prepare(data_cfg, tok, address=address, log=lambda m: click.echo(m, err=True))
    click.echo(str(prepared.cache_dir))


@data.command()
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec field (with a SPEC).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def info(target: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """What TARGET holds: a spec's cache entry, a packed entry, a token folder (complete or not) or a cache root."""
    from orchestrator.data.prepare import cache_info, format_info, info_json

    report = cache_info(target, overrides)
    click.echo(info_json(report) if as_json else format_info(report))
