"""Find and load a trained checkpoint in-process (no Ray), for `difflm sample|eval|denoise` and benchmarks.

A reference may be any of:

    runs/q                     a run dir: its ``checkpoints/best`` (else ``last``, else the newest
                               ``checkpoint_*`` folder Ray left there)
    runs/q/best, runs/q/last   the run's best / last checkpoint by name
    runs/q/checkpoints/best    the symlink itself
    runs/q/checkpoint_2026...  a checkpoint folder (holds ``model.safetensors``)

Nothing found raises :class:`~orchestrator.errors.SpecError` (exit 2) listing every path tried.
Only safetensors, YAML and JSON are read here: nothing is unpickled. When the run kept an EMA of
its weights (``train.ema``) the EMA is loaded, as validation used it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflm.data import Tokenizer, load_tokenizer
from difflm.families import Family
from orchestrator.build import build_family, special_ids  # special_ids re-exported (its old home)
from orchestrator.devices import local_device
from orchestrator.errors import SpecError
from orchestrator.spec.run import RunSpec, spec_from_dict

__all__ = ["LoadedCheckpoint", "resolve_checkpoint", "load_checkpoint", "special_ids"]

WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"  # the EMA of the weights (train.ema), what validation used: preferred here
NAMES = ("best", "last")


@dataclass
class LoadedCheckpoint:
    """A model ready for inference (eval mode, on ``device``) with everything saved beside it."""

    path: Path
    spec: RunSpec
    model: Family
    tokenizer: Tokenizer
    trainer_state: dict[str, Any]
    device: torch.device
    weights: str = WEIGHTS  # the file the weights came from: ema.safetensors when the run kept an EMA

    @property
    def step(self) -> int | None:
        step = self.trainer_state.get("step")
        return int(step) if step is not None else None

    @property
    def val_nll(self) -> float | None:
        """Training's val/nll at this checkpoint's step (what ``difflm eval`` reproduces)."""
        val = self.trainer_state.get("val", {}).get("val/nll")
        return float(val) if val is not None else None

    def describe(self) -> str:
        step = f", step {self.step}" if self.step is not None else ""
        ema = ", EMA weights" if self.weights == EMA_WEIGHTS else ""
        return f"{self.path} ({self.spec.model.family}{step}{ema}, {self.device.type})"


def _is_checkpoint(p: Path) -> bool:
    return (p / WEIGHTS).is_file()


def resolve_checkpoint(ref: str | Path) -> Path:
    """The checkpoint folder ``ref`` names (see the module docstring); SpecError listing the tries otherwise."""
    p = Path(ref).expanduser()
    tried: list[str] = []

    def attempt(candidate: Path) -> Path | None:
        tried.append(str(candidate))
        return candidate.resolve() if _is_checkpoint(candidate) else None

    found = attempt(p)
    if found is None and p.is_dir():
        for name in NAMES:
            found = found or attempt(p / "checkpoints" / name)
        if found is None:
            ray_dirs = sorted(p.glob("checkpoint_*"))
            tried.append(str(p / "checkpoint_*") + (f" ({len(ray_dirs)} found)" if ray_dirs else " (none)"))
            for d in reversed(ray_dirs):
                if _is_checkpoint(d):
                    found = d.resolve()
                    break
    if found is None and p.name in NAMES:
        found = attempt(p.parent / "checkpoints" / p.name)
    if found is not None:
        return found
    hint = "" if p.exists() else f" ({str(p)!r} does not exist)"
    raise SpecError(
        f"no checkpoint found for {str(ref)!r}{hint}; tried: {', '.join(tried)}. "
        f"Pass a run dir, RUN_DIR/best, RUN_DIR/last, or a folder holding {WEIGHTS}"
    )


def load_checkpoint(ref: str | Path, device: str | torch.device = "auto") -> LoadedCheckpoint:
    """Resolve ``ref``, rebuild the model from its saved spec and tokenizer, load the weights, eval mode."""
    from safetensors.torch import load_file

    import yaml

    path = resolve_checkpoint(ref)
    dev = device if isinstance(device, torch.device) else local_device(device)
    spec_file = path / "spec.yaml"
    if not spec_file.is_file():
        raise SpecError(f"{path} has {WEIGHTS} but no spec.yaml; it was not written by `difflm train`")
    spec = spec_from_dict(yaml.safe_load(spec_file.read_text()), source=str(spec_file))
    if not (path / "tokenizer").is_dir():
        raise SpecError(f"{path} has no tokenizer/ folder; it was not written by `difflm train`")
    tokenizer = load_tokenizer(path / "tokenizer")
    state_file = path / "trainer_state.json"
    trainer_state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    try:  # seeded like the run: any init randomness is overwritten by the weights; keep it quiet
        model = build_family(spec, tokenizer)
    except (KeyError, ValueError) as exc:
        raise SpecError(f"{spec_file}: cannot build the model: {exc.args[0] if exc.args else exc}") from None
    weights = EMA_WEIGHTS if (path / EMA_WEIGHTS).is_file() else WEIGHTS
    try:
        model.load_state_dict(load_file(str(path / weights), device="cpu"))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SpecError(f"{path / weights} does not match the model its spec.yaml describes: {first}") from None
    except Exception as exc:  # a truncated or corrupted safetensors file
        raise SpecError(f"{path / weights}: unreadable ({exc}); truncated or corrupted, try RUN_DIR/last or "
                        "another checkpoint") from None
    model = model.to(dev).eval()
    return LoadedCheckpoint(path=path, spec=spec, model=model, tokenizer=tokenizer, trainer_state=trainer_state,
                            device=dev, weights=weights)
