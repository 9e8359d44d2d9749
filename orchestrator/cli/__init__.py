"""The ``difflm`` command line: this module only assembles the command groups.

    difflm train | resume | tensorboard   orchestrator/cli/train.py
    difflm validate | schema     orchestrator/cli/spec.py
    difflm sweep | results            orchestrator/cli/sweep.py
    difflm sample | eval | denoise | export  orchestrator/cli/inference.py
    difflm bench asha | sampling      orchestrator/cli/bench.py
    difflm doctor SPEC                orchestrator/cli/doctor.py
    difflm cluster up | down | status orchestrator/cli/cluster.py
    difflm data prepare | info        orchestrator/cli/data.py
    difflm new-family NAME            orchestrator/cli/scaffold.py

A new command goes in the module of its group (or a new module) and is added here.
Bad input prints one message and exits 2 before Ray starts (``cli.common.user_errors``).
"""

from __future__ import annotations

import click

from orchestrator.cli import bench, cluster, data, doctor, inference, scaffold, spec, sweep, train
from orchestrator.cli.common import debug_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="difflm")
@debug_option
def main() -> None:
    """difflm: train, sweep and compare text diffusion language models."""


for _cmd in (
    train.train,
    train.tensorboard,
    spec.validate,
    spec.schema,
    sweep.sweep,
    train.resume,
    sweep.results,
    inference.sample,
    inference.eval_cmd,
    inference.denoise,
    inference.export,
    bench.bench,
    doctor.doctor,
    cluster.cluster,
    data.data,
    scaffold.new_family,
):
    main.add_command(_cmd)

__all__ = ["main"]
