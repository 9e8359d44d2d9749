"""Training engines: DeepSpeed where it runs, plain PyTorch (DDP across workers) otherwise.

Both expose the same small surface, so :class:`orchestrator.train.runner.Runner` never
branches on the backend:

    out = engine.forward(tokens, valid)      # LossOutput
    engine.backward(out.loss)                # loss scaled by 1/grad_accum inside
    engine.step()                            # every micro-batch; updates at the accumulation boundary
    engine.last_skipped                      # device flag: 1.0 when that update was skipped (non-finite)
    engine.lr, engine.grad_norm()            # read at log points only
    engine.save(dir) / engine.load(dir)      # optimizer + scheduler (+ weights for DeepSpeed)
    engine.ema_targets()                     # the tensors an EMA of the weights follows on this rank

DeepSpeed, like the torch engine here, scales the loss by 1/grad_accum and steps the
LR scheduler once per optimizer step.

Non-finite guard, without a host sync per step
----------------------------------------------
The optimizer is ``torch.optim.AdamW(fused=True)``, whose fused kernel takes a ``found_inf``
device tensor and makes the whole update a no-op on the device when it is 1 (weights, both
moments and the step count stay as they were): the mechanism ``torch.amp.GradScaler`` uses
for fp16. At each accumulation boundary the engine sets ``found_inf`` from a device flag:

* torch engine: any micro-batch loss non-finite, or the total gradient norm (which
  ``clip_grad_norm_`` computes anyway) non-finite;
* DeepSpeed: any micro-batch loss non-finite. Its gradients live in ZeRO partitions and
  buckets that the engine cannot read before ``step()`` without reaching into DeepSpeed's
  internals. DeepSpeed 0.19 itself skips a step whose global gradient norm is inf/nan under
  ZeRO-1/2/3 and with bf16 (``bf16.check_grad_overflow``, a host read it makes anyway); the
  device flag is what protects fp32 ZeRO-0, and such a DeepSpeed skip (read from its own host
  counter, ``skipped_steps``) is counted as a skipped step too, except under fp16, where
  skipping overflows is how the loss scale calibrates itself.

With several workers the flag is all-reduced (max) first, so every rank skips together
(a one-element collective, queued on the device like the gradient all-reduce; no ``.item()``).
The runner counts the flags on the device and reads them at log points. Without a fused
AdamW for the device, the torch engine falls back to reading the flag on the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import socket
import os
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from difflm.atomic import atomic_path, atomic_write_text
from difflm.families.base import Family, LossOutput
from orchestrator.errors import SpecError
from orchestrator.spec.run import RunSpec, TrainConfig
from orchestrator.train.optim import is_fused, make_optimizer, run_lr_lambda

ENGINE_STATE = "engine_state.pt"


class UnsafeCheckpointError(SpecError):
    """A checkpoint file holds pickled Python objects where difflm only ever writes tensors and numbers."""


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_max(flag: Tensor) -> Tensor:
    if world()[1] > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def load_tensors(path: Path, device: torch.device | str = "cpu") -> Any:
    """``torch.load`` that unpickles nothing but tensors and plain containers (``weights_only=True``).

    A file that needs more (a crafted pickle that would run code on load) is refused with
    :class:`UnsafeCheckpointError` naming it; difflm never writes such files.
    """
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it holds pickled Python objects, not plain tensors and numbers "
            f"({first}). difflm never writes such a file; do not resume from a checkpoint you did not create"
        ) from None


class Engine(Protocol):
    module: Family
    backend: str
    last_skipped: Tensor | None

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput: ...
    def backward(self, loss: Tensor) -> None: ...
    def step(self) -> None: ...
    @property
    def lr(self) -> float: ...
    def grad_norm(self) -> float | None: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...
    def train(self, mode: bool = True) -> None: ...
    def full_state_dict(self) -> dict[str, Tensor]: ...
    def ema_targets(self) -> tuple[list[tuple[str, Tensor]], bool]: ...
    def after_weight_swap(self) -> None: ...


class TorchEngine:
    """Plain PyTorch: AdamW, grad accumulation, clipping, autocast for bf16/fp16, DDP across workers.

    With a process group of several ranks the model is wrapped in DistributedDataParallel, so
    gradients are averaged and every replica takes the same step; rank 0 alone writes the
    (identical) optimizer state.
    """

    backend = "torch"

    def __init__(
        self, model: Family, train: TrainConfig, device: torch.device, lr_fn: Callable[[int], float] | None = None
    ) -> None:
        self.module = model.to(device)
        self.device = device
        self.accum = train.grad_accum
        self.clip = train.grad_clip
        self.rank, self.world_size = world()
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        if self.world_size > 1:
            # broadcast_buffers off: families' buffers are constants (rotary tables), and eval/sampling
            # calls self.module directly so no collective hides in them.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        self.optimizer, self.scheduler = make_optimizer(self.module, train, lr_fn)
        self._fused = is_fused(self.optimizer)
        self._micro = 0
        self._last_norm: Tensor | None = None
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        self.last_skipped: Tensor | None = None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
        self._autocast = (
            (lambda: torch.autocast(device_type=device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        )
        self._scaler = torch.amp.GradScaler(device.type) if train.precision == "fp16" else None

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        model: torch.nn.Module = self.module
        if self.ddp is not None and self.module.training and torch.is_grad_enabled():
            # Gradients are all-reduced only on the micro-batch that ends the accumulation (no_sync).
            self.ddp.require_backward_grad_sync = (self._micro + 1) % self.accum == 0
            model = self.ddp
        with self._autocast():
            return model(tokens, valid, generator)

    def backward(self, loss: Tensor) -> None:
        self._bad = self._bad | ~torch.isfinite(loss.detach())
        loss = loss / self.accum
        (self._scaler.scale(loss) if self._scaler else loss).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.accum:
            return
        if self._scaler:
            self._scaler.unscale_(self.optimizer)
        # Returned as a tensor: no host sync here; read at log points.
        self._last_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        bad = self._bad if self._scaler else self._bad | ~torch.isfinite(self._last_norm)
        flag = all_reduce_max(bad.float())  # 0-d float32 on the device: 1.0 = skip this update
        if self._scaler:
            # The scaler skips inf/nan gradients itself (found_inf on the fused kernel, its own otherwise);
            # an overflow while it calibrates its scale is not a bad step, so only the loss counts here.
            self._scaler.step(self.optimizer)
            self._scaler.update()
        elif self._fused:
            self.optimizer.found_inf = flag  # type: ignore[attr-defined]
            self.optimizer.step()
        elif not bool(flag):  # no fused kernel here: one host read per optimizer step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.last_skipped = flag
        self._bad = torch.zeros_like(self._bad)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def grad_norm(self) -> float | None:
        return None if self._last_norm is None else float(self._last_norm)

    def full_state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def ema_targets(self) -> tuple[list[tuple[str, Tensor]], bool]:
        """The parameters themselves (full on every rank); False: not partitioned."""
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad], False

    def after_weight_swap(self) -> None:
        pass

    def save(self, directory: Path) -> None:
        """Optimizer + scheduler + micro-step counter: plain tensors and numbers, loadable with weights_only."""
        if self.rank != 0:  # identical on every DDP rank: one writer
            return
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "micro": self._micro}
        if self._scaler is not None:
            state["scaler"] = self._scaler.state_dict()
        with atomic_path(directory / ENGINE_STATE) as tmp:
            torch.save(state, tmp)

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self.module.load_state_dict(load_file(str(directory / "model.safetensors"), device=str(self.device)))
        state = load_tensors(directory / ENGINE_STATE, self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self._scaler is not None and "scaler" in state:
            self._scaler.load_state_dict(state["scaler"])
        self._micro = int(state["micro"])


def effective_zero_stage(spec: RunSpec) -> int:
    """``scaling.zero_stage``, or 0 for a single worker.

    ZeRO partitions optimizer state, gradients (stage 2) and parameters (stage 3) across data-parallel
    ranks; with one rank there is nothing to partition and stages 1-3 only add gradient bucketing,
    copies and collectives (one worker, 8.3M parameters, CPU: 0.949x of a bare loop at stage 2,
    0.976x at stage 0, docs/benchmarks.md)."""
    return spec.scaling.zero_stage if spec.scaling.num_workers > 1 else 0


def deepspeed_config(spec: RunSpec) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from the spec (also saved with checkpoints)."""
    t = spec.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": effective_zero_stage(spec)},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def _dynamo_disabled() -> Any:
    """TORCHDYNAMO_DISABLE=1 for the duration: ``deepspeed.initialize`` imports DeepSpeed's Muon module
    only to list it as a ZeRO optimizer, and that module decorates functions with ``torch.compile``
    at import, which loads torch._inductor: 2-3 s of every run's start-up on a CPU box. With dynamo
    disabled the decorators are no-ops (difflm never uses Muon); torch.compile elsewhere is unaffected."""
    old = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHDYNAMO_DISABLE", None)
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = old


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the family; ZeRO 0-3, bf16/fp16, clipping, accumulation.

    DeepSpeed's own checkpoint files (``deepspeed/state/*.pt``) are pickles that DeepSpeed loads
    with ``weights_only=False``; difflm loads them only from the run's own folder (see
    orchestrator.rundir.ckpt_files), never from a path a user passes in.
    """

    backend = "deepspeed"

    def __init__(self, model: Family, spec: RunSpec, device: torch.device) -> None:
        import deepspeed  # only here: difflm/ never imports it, and the CLI starts fast

        use_keyed_extensions_dir()  # before DeepSpeed may compile its CPU comm op (initialize)

        model = model.to(device)
        opt, sched = make_optimizer(model, spec.train, run_lr_lambda(spec))
        self.config = deepspeed_config(spec)
        with _dynamo_disabled():
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=opt, lr_scheduler=sched, config=self.config
            )
        self.module: Family = self.engine.module
        self.device = device
        self.zero_stage = effective_zero_stage(spec)
        if self.zero_stage == 0 and self.engine.dp_world_size == 1:
            # An all-reduce over one rank is the identity, but DeepSpeed still flattens every gradient into
            # buckets, runs the collective and copies them back: 1.3% of a `small` fp32 step on CPU
            # (py-spy of a `difflm train` worker). ZeRO 1-3 (from 2 workers) keep their own reduction.
            self.engine.enable_backward_allreduce = False
        self._fp16 = spec.train.precision == "fp16"
        # The torch AdamW DeepSpeed's wrappers (ZeRO, bf16) step on their fp32 partitions.
        self._basic = self.engine.basic_optimizer
        self._fused = is_fused(self._basic)
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        self.last_skipped: Tensor | None = None

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        return self.engine(tokens, valid, generator)

    def backward(self, loss: Tensor) -> None:
        self._bad = self._bad | ~torch.isfinite(loss.detach())
        self.engine.backward(loss)

    def step(self) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # counts the micro-step; no update
            return
        flag = all_reduce_max(self._bad.float())
        if self._fused:
            self._basic.found_inf = flag  # the fused kernel makes the update a no-op when 1
        ds_skipped = self.engine.skipped_steps
        self.engine.step()
        if self.engine.skipped_steps > ds_skipped and not self._fp16:  # DeepSpeed skipped it itself (host int)
            flag = torch.ones_like(flag)
        self.last_skipped = flag
        self._bad = torch.zeros_like(self._bad)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: Path) -> None:
        # Collective: every rank writes its ZeRO partition under directory/deepspeed.
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state")
        if self.engine.global_rank == 0:
            atomic_write_text(directory / "deepspeed_config.json", json.dumps(self.config, indent=2))

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state")
        if path is None:
            raise FileNotFoundError(f"{directory / 'deepspeed'}: DeepSpeed found no checkpoint to load")

    def full_state_dict(self) -> dict[str, Tensor]:
        """Whole fp32/bf16 weights on every rank (gathers ZeRO-3 partitions; collective)."""
        if self.zero_stage == 3:
            import deepspeed

            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}
        return self.engine.module.state_dict()

    def ema_targets(self) -> tuple[list[tuple[str, Tensor]], bool]:
        """ZeRO-3: each parameter's local partition (``ds_tensor``), so an EMA costs 1/world of the
        weights per rank and never gathers; True: partitioned. Otherwise the full parameters."""
        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        if self.zero_stage == 3:
            return [(n, p.ds_tensor) for n, p in named], True
        return named, False

    def after_weight_swap(self) -> None:
        """ZeRO-3 keeps small parameters gathered ("persistent"); after their partitions were written
        (EMA swapped in or out) regather them, as DeepSpeed does after an optimizer step."""
        if self.zero_stage != 3:
            return
        persistent = getattr(self.engine.optimizer, "persistent_parameters", None) or []
        if persistent:
            persistent[0].all_gather(persistent)


def init_single_rank_group(device: torch.device) -> None:
    """A torch process group of one (this process, a free local port): DeepSpeed needs one even for a
    single rank. For code that runs outside a Ray Train worker group (`difflm bench` in-process, a
    one-worker sweep trial in its Tune actor); a no-op when a group exists."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def keyed_extensions_dir() -> Path:
    """Where this environment's compiled torch/DeepSpeed extensions go: one folder per environment.

    torch caches extensions under ``~/.cache/torch_extensions/py311_cpu/<name>``, keyed by Python
    version and accelerator only, but the build (``build.ninja``) names the environment's own paths
    (its torch and DeepSpeed folders, Python headers). Two environments on one machine (the project's
    ``.venv`` and a second venv, or two checkouts) therefore rebuild ``deepspeed_shm_comm`` every time
    the other one ran: 69-70 s on 2 cores, and the first-compile notice stayed silent because the
    ``.so`` existed. The key is a hash of those paths and the versions, so each environment builds once."""
    import importlib.util
    import sys
    import sysconfig

    from torch.utils.cpp_extension import get_default_build_root

    ds = importlib.util.find_spec("deepspeed")
    parts = [
        sys.prefix, sys.version, str(Path(torch.__file__).parent), torch.__version__,
        str(ds.origin) if ds is not None else "", sysconfig.get_paths().get("include", ""),
    ]
    try:
        from importlib.metadata import version

        parts.append(version("deepspeed"))
    except Exception:  # not installed: the key only has to differ between environments
        pass
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_{accel}"
    return Path(get_default_build_root()) / f"difflm-{tag}-{digest}"


def use_keyed_extensions_dir() -> Path:
    """Point TORCH_EXTENSIONS_DIR at :func:`keyed_extensions_dir` unless the user set it; returns it.
    Called before anything DeepSpeed may compile (the engine, the first-compile notice)."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(keyed_extensions_dir())
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def deepspeed_cpu_op_pending() -> Path | None:
    """Where DeepSpeed will compile its CPU shared-memory communication op as it initialises, or None.

    DeepSpeed's CPU accelerator builds ``deepspeed_shm_comm`` with ninja the first time a process group
    comes up on a machine (about 27 s on 2 cores; cached under TORCH_EXTENSIONS_DIR, by default
    ~/.cache/torch_extensions), even for one worker. The console says so, or a first run looks hung.
    Best effort: None whenever it cannot tell (another DeepSpeed or torch version)."""
    try:
        use_keyed_extensions_dir()
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or installed_ops.get(builder.NAME, False):
            return None  # no such op here, or built when DeepSpeed was installed
        if not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return None
        folder = Path(_get_build_directory(builder.NAME, verbose=False))
        return None if (folder / f"{builder.NAME}.so").is_file() else folder
    except Exception:
        return None


def deepspeed_cpu_op_notice() -> str | None:
    """The console line for :func:`deepspeed_cpu_op_pending` (a run's worker and `difflm bench`), or None."""
    folder = deepspeed_cpu_op_pending()
    if folder is None:
        return None
    return (f"DeepSpeed compiles its CPU communication op on first use on this machine "
            f"(about 30 s on 2 cores, once; kept in {folder})")
