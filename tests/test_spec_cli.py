"""Run-spec validation and the CLI's handling of bad input: one message, exit 2, no traceback, before Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.spec.run import RunSpec, load_run_spec
from orchestrator.spec.yamlio import spec_yaml

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _run(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output


def test_defaults_valid_and_dims_resolve() -> None:
    spec = RunSpec()
    assert spec.model.family == "mdlm" and spec.diffusion.schedule == "loglinear"
    assert spec.model.dims()["d_model"] == 128
    assert RunSpec.model_validate({"model": {"size": "base"}}).model.dims() == {
        "d_model": 768, "n_layers": 12, "n_heads": 12, "cond_dim": 128,
    }


def test_overrides_are_typed_and_revalidated(tmp_path: Path) -> None:
    p = _write(tmp_path, "train:\n  max_steps: 10\n")
    spec = load_run_spec(p, ["train.lr=1e-3", "scaling.zero_stage=2", "model.time_conditioning=true"])
    assert spec.train.lr == pytest.approx(1e-3) and spec.scaling.zero_stage == 2 and spec.model.time_conditioning
    with pytest.raises(SpecError, match=r"train\.lr: Input should be greater than 0"):
        load_run_spec(p, ["train.lr=-1"])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("train:\n  lr: 1.0e-3\n   max_steps: 5\n", r"spec\.yaml: line 3, column \d+: YAML syntax error: mapping values"),
        ("train:\n  max_stepz: 10\n", r"spec\.yaml:2: train\.max_stepz: unknown key 'max_stepz'; did you mean 'max_steps'\?"),
        ("train:\n  max_steps: lots\n", r"train\.max_steps: Input should be a valid integer.*\(got 'lots'\)"),
        ("diffusion:\n  likelihood_weight: 1.5\n", r"diffusion\.likelihood_weight: Input should be less than or equal to 1"),
        ("model:\n  family: mdml\n", r"unknown family 'mdml'.*Did you mean 'mdlm'\?"),
        ("diffusion:\n  schedule: cosinus\n", r"schedule 'cosinus' is not a mdlm schedule; choose one of loglinear, linear, cosine"),
        ("scaling:\n  device: tpu\n", r"scaling\.device: Input should be 'auto', 'cuda', 'mps' or 'cpu'"),
        ("train:\n  eval_every: 30\n  checkpoint_every: 100\n", r"must be a multiple of eval_every"),
        # fields the chosen family or engine would silently ignore
        ("model:\n  family: ar\ndiffusion:\n  schedule: bogus\n", r"diffusion\.schedule: not used by family ar"),
        ("model:\n  family: ar\ndiffusion:\n  schedule: loglinear\n", r"diffusion\.schedule: not used by family ar"),
        ("model:\n  family: ar\n  time_conditioning: true\n", r"model\.time_conditioning: not used by family ar"),
        ("model:\n  family: diffusion_lm\ndiffusion:\n  eps: 0.01\n  sampling_eps: 0.1\n",
         r"diffusion\.eps: not used by family diffusion_lm.*\n.*diffusion\.sampling_eps: not used by family diffusion_lm"),
        # the holes of the old allow-list (issue 19): bijective's own model field, a default-valued ATAT field
        ("model:\n  family: mdlm\n  bijective_blocks: 3\n",
         r"spec\.yaml:3: model\.bijective_blocks: not used by family mdlm .*; read by family bijective"),
        ("model:\n  family: ar\ndiffusion:\n  atat:\n    strength: 2.0\n",
         r"diffusion\.atat: not used by family ar .*ar's diffusion keys: none; read by family mdlm"),
        ("model:\n  family: sedd\ndiffusion:\n  likelihood_weigth: 0.5\n",
         r"diffusion\.likelihood_weigth: not used by family sedd"),
        ("diffusion:\n  sample_steps: null\n",
         r"diffusion\.sample_steps: Input should be a valid integer \(got None\); null does not reset a field"),
        ("model:\n  family: diffusion_lm\n  time_conditioning: true\n", r"model\.time_conditioning: not used by family diffusion_lm"),
        ("model:\n  family: mdlm\n  embed_dim: 32\n", r"model\.embed_dim: not used by family mdlm"),
        ("diffusion:\n  clamp_sampling: true\n", r"diffusion\.clamp_sampling: not used by family mdlm"),
        ("diffusion:\n  timesteps: 100\n", r"diffusion\.timesteps: not used by family mdlm"),
        ("scaling:\n  deepspeed: false\n  zero_stage: 2\n", r"scaling\.zero_stage 2 needs DeepSpeed, but scaling\.deepspeed is false"),
    ],
)
def test_bad_specs_exit_2_with_message(tmp_path: Path, text: str, expected: str) -> None:
    p = _write(tmp_path, text)
    for cmd in (["validate", str(p)], ["train", str(p)]):
        code, out = _run(cmd)
        assert code == 2, out
        assert "Traceback" not in out
        import re

        assert re.search(expected, out), out


def test_family_sections_are_the_familys_own_classes_and_old_resolved_specs_load() -> None:
    """model/diffusion validate as the family's classes (from its registry entry); a resolved spec written
    by the flat-config code (every field spelled out, defaults included) still loads for every family,
    while a non-default unread field in it is still refused; the JSON Schema lists each family's fields."""
    import yaml

    from difflm.families.registry import get_family
    from orchestrator.spec.yamlio import validate_as

    old_mdlm = {"family": "mdlm", "size": "tiny", "d_model": None, "n_layers": None, "n_heads": None, "cond_dim": None,
                "dropout": 0.0, "time_conditioning": False, "backbone": "transformer", "embed_dim": 64,
                "bijective_blocks": None, "pretrained_path": None}
    old_diff = {"schedule": None, "eps": 0.001, "sampling_eps": 0.001, "antithetic": True, "likelihood_weight": None,
                "timesteps": 2000, "sample_steps": 128, "clamp_sampling": False, "graph": "absorb", "sigma_min": 0.0001,
                "sigma_max": 20.0, "atat": {"importance_head": False, "strength": 2.0}}
    for fam in ("mdlm", "ar", "sedd", "diffusion_lm", "bijective"):
        spec = RunSpec.model_validate({"model": old_mdlm | {"family": fam}, "diffusion": old_diff})
        assert type(spec.model) is get_family(fam).model_config and type(spec.diffusion) is get_family(fam).config
        again = RunSpec.model_validate(yaml.safe_load(spec_yaml(spec)))  # and the new dump round-trips
        assert again.model_dump() == spec.model_dump()
    assert "family" not in RunSpec().model_dump()["diffusion"]  # the tag is never written
    assert RunSpec.model_validate({"model": {"family": "ar"}}).model_dump()["diffusion"] == {}
    with pytest.raises(SpecError, match=r"diffusion\.timesteps: not used by family mdlm"):
        validate_as(RunSpec, {"model": old_mdlm, "diffusion": old_diff | {"timesteps": 50}}, "old.yaml")
    schema = RunSpec.model_json_schema()
    defs = schema["$defs"]
    assert "bijective_blocks" in defs["BijectiveModelConfig"]["properties"]
    assert "bijective_blocks" not in defs["MdlmModelConfig"]["properties"]
    assert set(defs["SeddConfig"]["properties"]) >= {"graph", "sigma_min"} and "atat" not in defs["SeddConfig"]["properties"]
    assert RunSpec.model_validate({"train": {"ema": 0}}).train.ema is None  # 0 = off, spelled null


def test_set_model_family_drops_what_the_new_family_does_not_read(tmp_path: Path) -> None:
    """`--set model.family=ar` on an mdlm spec works: the file's mdlm-only fields are dropped with a note
    naming them; a field the new family does not read that the --set itself names still exits 2."""
    p = _write(tmp_path, "model:\n  family: mdlm\n  time_conditioning: true\ndiffusion:\n  schedule: cosine\n"
                         "  likelihood_weight: 0.5\n  atat: {importance_head: true}\ntrain:\n  max_steps: 5\n")
    code, out = _run(["validate", str(p), "--set", "model.family=ar"])
    assert code == 0, out
    assert ("--set model.family=ar (the file's family: mdlm): dropped model.time_conditioning, diffusion.schedule, "
            "diffusion.likelihood_weight, diffusion.atat, which ar does not read") in out
    spec = load_run_spec(p, ["model.family=diffusion_lm"])  # keeps what diffusion_lm reads, drops the rest
    assert spec.diffusion.schedule == "cosine" and spec.diffusion.likelihood_weight == 0.5
    assert not hasattr(spec.diffusion, "atat") and not hasattr(spec.model, "time_conditioning")
    code, out = _run(["validate", str(p), "--set", "model.family=ar", "--set", "diffusion.eps=0.01"])
    assert code == 2 and "diffusion.eps: not used by family ar" in out, out
    code, out = _run(["train", str(p), "--set", "model.family=ar", "--set", "model.embed_dim=32"])
    assert code == 2 and "model.embed_dim: not used by family ar" in out and "Traceback" not in out, out
    assert "dropped" not in _run(["validate", str(p)])[1]  # no switch, no note


def test_missing_file_exit_2(tmp_path: Path) -> None:
    code, out = _run(["train", str(tmp_path / "nope.yaml")])
    assert code == 2 and "nope.yaml: file not found" in out


def test_bad_override_syntax(tmp_path: Path) -> None:
    p = _write(tmp_path, "train:\n  lr: 0.1\n")
    code, out = _run(["train", str(p), "--set", "train.lr"])
    assert code == 2 and "expected dotted.key=value" in out
    code, out = _run(["train", str(p), "--set", "train.lr.x=1"])
    assert code == 2 and "train.lr is a value, not a section" in out


def test_resources_checked_before_ray(tmp_path: Path) -> None:
    p = _write(tmp_path, "scaling:\n  num_workers: 512\n  device: cpu\n")
    code, out = _run(["train", str(p)])
    assert code == 2 and "512 workers x 1 CPUs = 512 CPUs, but this machine has" in out
    import torch

    if not torch.cuda.is_available():
        p = _write(tmp_path, "scaling:\n  device: cuda\n")
        code, out = _run(["train", str(p)])
        assert code == 2 and "device is cuda but this machine has no GPU" in out


def test_sweep_file_refused_by_train(tmp_path: Path) -> None:
    p = _write(tmp_path, "sweep:\n  search: {}\n")
    code, out = _run(["train", str(p)])
    assert code == 2 and "difflm sweep" in out


def test_schema_lists_sections_and_descriptions() -> None:
    code, out = _run(["schema"])
    assert code == 0
    schema = json.loads(out)
    assert set(schema["properties"]) == {"model", "diffusion", "data", "tokenizer", "train", "scaling", "output", "stages"}
    for section in ("TrainConfig", "AtatConfig", "StageConfig"):
        fields = schema["$defs"][section]["properties"]
        assert all("description" in f for f in fields.values()), section


def test_every_field_has_a_description() -> None:
    from pydantic import BaseModel

    def walk(cls: type[BaseModel]) -> None:
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann)

    walk(RunSpec)


def test_shipped_yaml_specs_validate() -> None:
    files = sorted((REPO / "sweeps").rglob("*.yaml"))
    assert files, "no specs shipped"
    code, out = _run(["validate", *map(str, files)])
    assert code == 0, out
    assert out.count("ok:") == len(files)


def test_console_entry_point_exit_code(tmp_path: Path) -> None:
    """The installed `difflm` entry point (real process) exits 2 on bad input without a traceback."""
    p = _write(tmp_path, "model:\n  size: huge\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.size: Input should be 'tiny', 'small' or 'base'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cluster_configs_pass_rays_own_validator() -> None:
    import yaml

    from orchestrator.cluster.profile import is_ray_launcher_config
    from orchestrator.raycompat import validate_launcher_config

    files = [f for f in sorted((REPO / "clusters").glob("*.yaml")) if is_ray_launcher_config(yaml.safe_load(f.read_text()))]
    assert [f.name for f in files] == ["local.yaml"]
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        validate_launcher_config(cfg)
        assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
        assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
                   if "ray start" in c)
    bad = yaml.safe_load(files[0].read_text())
    bad["max_worker"] = 3  # a typo must not pass
    with pytest.raises(Exception, match="max_worker"):
        validate_launcher_config(bad)


def test_every_shipped_cluster_file_validates_and_says_what_it_is_for() -> None:
    """Profiles with difflm's Profile model, launcher configs with Ray's schema, all through `difflm validate`."""
    files = sorted((REPO / "clusters").glob("*.yaml"))
    assert {f.stem for f in files} >= {"local", "workstation-6gpu", "laptop-mps", "cpu"}
    code, out = _run(["validate", *map(str, files)])
    assert code == 0, out
    assert out.count("(profile)") == len(files) - 1 and out.count("(Ray cluster-launcher)") == 1, out
    for f in files:
        assert f.read_text().startswith("# "), f"{f.name}: start with a comment saying which machine it is for"


def test_bad_cluster_files_exit_2(tmp_path: Path) -> None:
    typo = _write(tmp_path, "cluster_name: x\nprovider: {type: local, head_ip: 1.2.3.4, worker_ips: []}\n"
                  "auth: {ssh_user: u}\nmax_worker: 2\n", "launcher.yaml")
    code, out = _run(["validate", str(typo)])
    assert code == 2 and "launcher.yaml: Ray's cluster-launcher schema rejects it" in out and "max_worker" in out
    prof = _write(tmp_path, "description: x\nscaling: {num_wrkers: 2}\n", "prof.yaml")
    code, out = _run(["validate", str(prof)])
    assert code == 2 and "prof.yaml:2: scaling.num_wrkers: unknown key 'num_wrkers'; did you mean 'num_workers'?" in out
