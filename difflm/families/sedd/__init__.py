"""Family ``sedd``: score-entropy discrete diffusion (Lou et al. 2024), absorb and uniform graphs.

    model.py     the SEDD family: DSE loss, val/nll through the shared estimator, denoise
    graphs.py    absorb / uniform graphs: corruption, log score, DSE, reverse-step pieces
    samplers.py  euler and analytic (Tweedie tau-leaping) samplers with the denoising step

Importing the package registers the family, with its samplers (analytic first: the default).
"""

from __future__ import annotations

from difflm.families.sedd.config import SeddConfig, SeddModelConfig
from difflm.families.registry import FamilySpec, register_family
from difflm.families.sedd.graphs import GRAPHS, Absorbing, Graph, Uniform, get_graph
from difflm.families.sedd import samplers as ss
from difflm.families.sedd.model import SEDD, SEDD_NOISES, build_sedd, check_sedd

register_family(
    FamilySpec(
        name="sedd",
        config=SeddConfig,
        model_config=SeddModelConfig,
        build=build_sedd,
        schedules=tuple(SEDD_NOISES),
        description="Score-entropy discrete diffusion (SEDD): absorb or uniform graph, denoising score entropy.",
        check=check_sedd,
        samplers={"analytic": ss.analytic, "euler": ss.euler},
    )
)

__all__ = ["SEDD", "Graph", "Absorbing", "Uniform", "GRAPHS", "get_graph", "build_sedd", "check_sedd"]
