"""`difflm export RUN --to DIR`: a self-contained model folder that loads without the run folder.

DIR holds ``model.safetensors`` (the weights validation used: the EMA when the run kept one),
``spec.yaml`` (the resolved run spec), ``tokenizer/``, ``trainer_state.json`` (step and val metrics),
``eval/*.json`` (the eval results the run has) and ``README.md`` (a model card: family, size, data,
val NLL ± SE, eval results, how to load). It is a checkpoint folder, so ``difflm sample DIR``,
``difflm eval DIR`` and :func:`orchestrator.rundir.checkpoints.load_checkpoint` read it as they read a
run's checkpoint. ``--push REPO`` uploads it with huggingface_hub where a hub is reachable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


from orchestrator.errors import SpecError

def export_run(ckpt: Any, to: Path, *, overwrite: bool = False) -> Path:
    """Write the export folder of the loaded checkpoint ``ckpt`` to ``to``; returns ``to``."""
    from safetensors.torch import save_file

    from orchestrator.eval.genppl import eval_dir

    to = Path(to).expanduser()
    if to.exists() and any(to.iterdir()):
        if not overwrite:
            raise SpecError(f"--to {to} exists and is not empty; give a new folder or --overwrite")
        shutil.rmtree(to)
    to.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in ckpt.model.state_dict().items()}
    save_file(state, str(to / "model.safetensors"), metadata={"format": "pt", "family": ckpt.spec.model.family})
    shutil.copy2(ckpt.path / "spec.yaml", to / "spec.yaml")
    shutil.copytree(ckpt.path / "tokenizer", to / "tokenizer")
    trainer_state = dict(ckpt.trainer_state)
    trainer_state["exported_from"] = str(ckpt.path)
    trainer_state["weights"] = ckpt.weights
    (to / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    results: dict[str, Any] = {}
    src = eval_dir(ckpt.path)
    if src.is_dir():
        (to / "eval").mkdir()
        for f in sorted(src.glob("*")):
            if f.is_file():
                shutil.copy2(f, to / "eval" / f.name)
                if f.suffix == ".json":
                    results[f.stem] = json.loads(f.read_text())
    (to / "README.md").write_text(model_card(ckpt, results, to))
    return to


def model_card(ckpt: Any, results: dict[str, Any], to: Path) -> str:
    """A Markdown model card: what the model is, its val NLL ± SE, the eval results, how to load it."""
    spec = ckpt.spec
    val = ckpt.trainer_state.get("val", {})
    nll, se = val.get("val/nll"), val.get("val/nll_se")
    params = sum(p.numel() for p in ckpt.model.parameters())
    kind = "exact NLL" if ckpt.model.exact_likelihood else "NLL bound (NELBO)"
    lines = [
        f"# difflm {spec.model.family} model", "",
        f"- family: `{spec.model.family}` ({params:,} parameters), step {ckpt.step}, weights from `{ckpt.weights}`",
        f"- data: `{spec.data.source}` {spec.data.path or ''}, seq_len {spec.data.seq_len}, tokenizer `{spec.tokenizer.kind}`",
        f"- val {kind}: " + (f"{nll:.4f} ± {se or 0.0:.4f} nats/token (val split, seed {spec.train.eval_seed}, "
                             f"{spec.train.eval_samples} draws per sequence; `difflm eval` reproduces it)"
                             if nll is not None else "not recorded"),
        "",
    ]
    if results:
        lines += ["## Eval results", ""]
        for name, res in results.items():
            lines += [f"### {name}", "", "```json", json.dumps(res, indent=1)[:4000], "```", ""]
    lines += ["## Load", "", "```bash", f"difflm sample {to} --num 4", f"difflm eval {to} --data held_out.txt", "```",
              "", "```python", "from orchestrator.rundir.checkpoints import load_checkpoint",
              f'ckpt = load_checkpoint("{to}", "cpu")  # .model (eval mode), .tokenizer, .spec',
              "print(ckpt.tokenizer.decode(ckpt.model.sample(2, ckpt.spec.data.seq_len, 64)[0].tolist()))",
              "```", "", "The resolved spec is `spec.yaml`; the full spec schema is `difflm schema`.", ""]
    return "\n".join(lines)


def push(folder: Path, repo: str) -> str:
    """Upload ``folder`` to the Hugging Face Hub repo ``repo`` (needs network + a token); returns the URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise SpecError("--push needs huggingface_hub: pip install huggingface_hub") from None
    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo)
    except Exception as exc:  # noqa: BLE001 - no network / no token: one line
        raise SpecError(f"--push {repo}: the hub is not reachable or refused ({str(exc).splitlines()[0]})") from None
    return f"https://huggingface.co/{repo}"
