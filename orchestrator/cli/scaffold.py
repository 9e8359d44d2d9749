"""``difflm new-family NAME``: scaffold a family package that trains, samples and passes the family contract.

The package (``difflm/families/NAME/`` by default, or ``--into DIR/NAME/`` for a plugin outside the tree)
holds what every family has: ``config.py`` (its ``diffusion:`` / ``model:`` section classes, which the run
spec's per-family union picks by ``model.family``), ``model.py`` (a small masked-LM family on the shared
Backbone: a working starting point to replace, not a stub), ``samplers.py`` (one sampler) and
``__init__.py`` (the ``register_family`` call naming all of them). In the tree, the package's import is
added to ``difflm/families/__init__.py``, so the registry, the spec, the CLI and the shared contract suite
(tests/test_family_contract.py, parametrised over the registry) pick it up with no other edit.

The generated package imports its own modules relatively, so it works under ``difflm.families`` and as a
top-level plugin package alike.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

import click

from orchestrator.cli.common import user_errors
from orchestrator.errors import SpecError

_INIT = Template('''"""Family ``$name``: scaffolded by ``difflm new-family $name``; replace the masked-LM template in model.py.

    config.py    the family's ``diffusion:`` / ``model:`` sections ($Class.Config, $Class.ModelConfig)
    model.py     $Class: loss (forward), val_nll, and the registry builder
    samplers.py  the family's samplers, registered below (the first is the default)

Importing the package registers the family; tests/test_family_contract.py then runs the shared contract on it.
"""

from __future__ import annotations

from difflm.families.registry import FamilySpec, register_family
from difflm.schedules import MDLM_SCHEDULES

from . import samplers
from .config import ${Class}Config, ${Class}ModelConfig
from .model import $Class, build_$name

register_family(
    FamilySpec(
        name="$name",
        config=${Class}Config,
        model_config=${Class}ModelConfig,
        build=build_$name,
        schedules=MDLM_SCHEDULES,
        description="$name: scaffolded masked-LM family (replace this line with what it is).",
        samplers={"reveal": samplers.reveal},
    )
)

__all__ = ["$Class", "build_$name"]
''')

_CONFIG = Template('''"""Family ``$name``'s spec sections: exactly the fields it reads (anything else is an unknown key).

Combine the field groups of ``difflm/families/config.py`` (schedule, continuous time, likelihood weight, ...)
and the model mixins of ``difflm/models/config.py``; add your own fields here with a description each.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from difflm.families.config import ContinuousTimeFields, ScheduleFields
from difflm.models.config import BackboneConfig


class ${Class}Config(ContinuousTimeFields, ScheduleFields):
    """The ``diffusion:`` section of family $name."""

    family: Literal["$name"] = Field("$name", exclude=True, description="Set from model.family; do not write it.")


class ${Class}ModelConfig(BackboneConfig):
    """The ``model:`` section of family $name."""

    family: Literal["$name"] = Field("$name", description="Model family from the registry.")
''')

_MODEL = Template('''"""Family ``$name``: a masked language model on the shared Backbone (the scaffold's template).

Each counted token is replaced by a mask id (``vocab_size``) with probability move_chance(t), t ~ U[eps, 1];
the loss is the continuous-time bound ``nelbo_weight(t) * -log p(x0 | x_t)`` summed over masked tokens and
averaged over the counted ones. ``val_nll`` integrates the same bound over the shared masking rate m
(weight 1/m, the noise of difflm.evaluation), so val/nll compares with every other family's.
Replace it with your family's model; keep the Family contract (forward, val_nll; see difflm/families/base.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflm.families.base import Family, wide_float
from difflm.losses import token_cross_entropy
from difflm.models.backbone import Backbone
from difflm.schedules import NoiseSchedule, get_schedule, sample_times
from difflm.types import LossOutput, ValNoise


class $Class(Family):
    """Masked LM: the backbone reads and writes ``vocab_size + 1`` ids (the extra one is the mask)."""

    name = "$name"

    def __init__(self, backbone: Backbone, vocab_size: int, schedule: NoiseSchedule, *, sampling_eps: float = 1e-3,
                 antithetic: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.schedule = schedule
        self.sampling_eps = sampling_eps
        self.antithetic = antithetic

    def ce(self, xt: Tensor, tokens: Tensor) -> Tensor:
        """-log p(x0 | x_t) per position (B, L), float32; the mask id is never a prediction."""
        logits = self.backbone(xt)  # (B, L, V+1)
        B, L = tokens.shape
        return token_cross_entropy(logits.flatten(0, 1), tokens.flatten(), classes=self.mask_id).view(B, L)

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        dtype = torch.promote_types(self.backbone.embed.weight.dtype, torch.float32)
        t = sample_times(tokens.shape[0], sampling_eps=self.sampling_eps, antithetic=self.antithetic,
                         device=tokens.device, dtype=dtype, generator=generator)  # (B,)
        u = torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=dtype)  # (B, L)
        masked = (u < self.schedule.move_chance(t)[:, None]) & valid  # (B, L)
        xt = torch.where(masked, self.mask_id, tokens)
        weight = torch.where(masked, self.schedule.nelbo_weight(t)[:, None], 0.0)  # (B, L); 0 off the masks
        per_token = weight * self.ce(xt, tokens).masked_fill(~masked, 0.0)  # (B, L)
        num_tokens = valid.sum()
        loss = per_token.sum() / num_tokens.clamp(min=1).to(per_token.dtype)
        return LossOutput(loss=loss, nll_sum=per_token.detach().sum(dtype=wide_float(tokens.device)),
                          num_tokens=num_tokens, metrics={"nelbo": loss.detach()})

    @torch.no_grad()
    def val_nll(self, tokens: Tensor, counted: Tensor, noise: ValNoise) -> Tensor:
        """(B, K) bound sums over counted tokens: draw k masks ``noise.masked(k, counted)`` at rate m and
        weighs the masked CE by ``noise.weights[:, k] / m``."""
        wide = wide_float(tokens.device)
        out = torch.empty(tokens.shape[0], noise.samples, dtype=wide, device=tokens.device)
        for k in range(noise.samples):
            masked = noise.masked(k, counted)  # (B, L)
            ce = self.ce(torch.where(masked, self.mask_id, tokens), tokens).masked_fill(~masked, 0.0)
            out[:, k] = ce.sum(dim=-1, dtype=wide) * (noise.weights[:, k].to(wide) / noise.rates[:, k].to(wide))
        return out


def build_$name(model_cfg: Any, diffusion_cfg: Any, vocab_size: int, **special_ids: Any) -> $Class:
    """Registry builder (special ids unused): the shared backbone from the ``model:`` section."""
    backbone = Backbone.from_config(model_cfg, vocab_in=vocab_size + 1, vocab_out=vocab_size + 1)
    return $Class(backbone, vocab_size, get_schedule(diffusion_cfg.schedule, diffusion_cfg.eps),
                  sampling_eps=diffusion_cfg.sampling_eps, antithetic=diffusion_cfg.antithetic)
''')

_SAMPLERS = Template('''"""Family ``$name``'s samplers, registered in its FamilySpec (``__init__.py``); each is
``fn(model, options, generator) -> SampleOutput``.

``reveal``: start from masks (prompt positions fixed), then over ``steps`` equal time steps from 1 to 0 reveal
each mask with probability (move(t) - move(s)) / move(t), drawing its id from p(x0 | x_t); masks left at the end
take the argmax.
"""

from __future__ import annotations

from typing import Any

import torch

from difflm.sampling.core import adjust_log_probs, draw, reject_unsupported, start_tokens
from difflm.types import SampleOptions, SampleOutput


@torch.no_grad()
def reveal(model: Any, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    options.validate()
    reject_unsupported(options, "reveal")
    x, fixed = start_tokens(options, model.mask_id, model.device)  # (N, L) each
    move = model.schedule.move_chance(torch.linspace(1.0, options.eps, options.steps + 1, device=x.device))
    nfe = 0
    for i in range(options.steps):
        masked = x == model.mask_id
        if not bool(masked.any()):
            break
        logp = adjust_log_probs(model.backbone(x)[..., : model.mask_id].float().log_softmax(-1),
                                options.temperature, options.top_p)  # (N, L, V)
        nfe += 1
        u = torch.rand(x.shape, generator=generator, device=x.device)
        go = masked & (u < (move[i] - move[i + 1]) / move[i])
        x = torch.where(go, draw(logp, options.temperature, generator), x)
    masked = x == model.mask_id
    if bool(masked.any()):
        x = torch.where(masked, model.backbone(x)[..., : model.mask_id].argmax(-1), x)
        nfe += 1
    return SampleOutput(tokens=x, fixed=fixed, nfe=nfe)
''')

FILES = {"__init__.py": _INIT, "config.py": _CONFIG, "model.py": _MODEL, "samplers.py": _SAMPLERS}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def class_name(name: str) -> str:
    """``my_family`` -> ``MyFamily``."""
    return "".join(part.capitalize() for part in name.split("_"))


def check_name(name: str) -> None:
    """SpecError (exit 2) for a name that is not a lower-case identifier or is already registered."""
    from difflm.families import family_names

    if not _NAME.match(name) or keyword.iskeyword(name):
        raise SpecError(f"new-family: {name!r} is not a valid family name; use a lower-case Python identifier "
                        "(letters, digits, _; starting with a letter), e.g. my_family")
    if name in family_names():
        raise SpecError(f"new-family: family {name!r} is already registered (registered: {', '.join(family_names())}); "
                        "choose another name")


def scaffold_family(name: str, into: Path) -> list[Path]:
    """Write the package ``into/name/`` (see the module docstring); returns the files written."""
    check_name(name)
    target = into / name
    for taken in (target, into / f"{name}.py"):
        if taken.exists():
            raise SpecError(f"new-family: {taken} already exists; choose another name")
    target.mkdir(parents=True)
    written = []
    for fname, template in FILES.items():
        path = target / fname
        path.write_text(template.substitute(name=name, Class=class_name(name)))
        written.append(path)
    return written


def _register_in_tree(name: str, families_dir: Path) -> Path:
    """Append the package's import to difflm/families/__init__.py (the built-in families' registration)."""
    init = families_dir / "__init__.py"
    text = init.read_text()
    line = f"from difflm.families import {name}  # noqa: E402,F401  isort: skip  (difflm new-family)\n"
    marker = "\n\ndef build_model("
    if marker not in text:
        raise SpecError(f"new-family: cannot find where to add the import in {init}; add `{line.strip()}` by hand")
    init.write_text(text.replace(marker, line + marker, 1))
    return init


@click.command("new-family")
@click.argument("name")
@click.option("--into", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to create the package NAME/ in (a plugin package outside the tree: import it to "
                   "register the family). Default: difflm/families/, with its import added there.")
@user_errors
def new_family(name: str, into: Path | None) -> None:
    """Scaffold a model family NAME: config.py, model.py (a working masked-LM template), samplers.py and its
    registry entry; the shared family contract (tests/test_family_contract.py) then runs on it."""
    import difflm.families

    families_dir = Path(difflm.families.__file__).resolve().parent
    written = scaffold_family(name, into if into is not None else families_dir)
    for path in written:
        click.echo(f"wrote {path}")
    if into is None:
        click.echo(f"registered: added its import to {_register_in_tree(name, families_dir)}")
        click.echo(f"next: fill {families_dir / name / 'model.py'}, then "
                   "`pytest tests/test_family_contract.py -k " + name + "` (the contract runs on it by itself)")
    else:
        click.echo(f"next: `import {name}` (with {into} on sys.path) registers it; fill model.py")
