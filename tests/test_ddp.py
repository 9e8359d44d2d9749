"""`scaling.deepspeed: false` with several workers: two real processes (gloo), TorchEngine under DDP.

Each rank reads different batches and draws different noise, so unsynchronised replicas would drift
apart at the first step; DDP keeps them identical. A non-finite loss on one rank only is skipped on both.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.helpers import free_port

SPEC = {
    "model": {"family": "mdlm", "size": None, "d_model": 32, "n_layers": 1, "n_heads": 2, "cond_dim": 16},
    "diffusion": {"sample_steps": 2},
    "data": {"source": "builtin", "seq_len": 32, "max_documents": 120},
    "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 0,
              "eval_every": 4, "checkpoint_every": 4, "num_samples": 0},
    "scaling": {"deepspeed": False, "device": "cpu", "num_workers": 2},
}


def _worker(rank: int, world: int, port: int, cache: str, out: str) -> None:
    import torch.distributed as dist

    from difflm.data import prepare_data
    from difflm.families import build_model
    from orchestrator.train.engine import TorchEngine
    from orchestrator.train.runner import Runner, WorkerContext
    from orchestrator.spec.run import RunSpec
    from tests.helpers import InjectNaN

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    raw = {**SPEC, "data": {**SPEC["data"], "cache_dir": cache}}
    spec = RunSpec.model_validate(raw)
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    torch.manual_seed(spec.train.seed)
    # step 3 (micro-batches 5 and 6), rank 1 only: an inf loss whose gradients stay finite, so DDP's average
    # alone would not tell rank 0; the all-reduced skip flag must.
    model = InjectNaN(build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size),
                      lambda call: rank == 1 and call in (5, 6), add_inf=True)
    cpu = torch.device("cpu")
    engine = TorchEngine(model, spec.train, cpu)
    runner = Runner(spec, data, engine, WorkerContext(rank, world, cpu))
    flat = lambda: torch.cat([p.detach().flatten() for p in engine.module.parameters()])  # noqa: E731
    snapshots = [flat()]
    for _ in range(4):
        runner.train_step()
        snapshots.append(flat())
    runner.save(Path(out) / f"rank{rank}")
    torch.save({"snapshots": torch.stack(snapshots), "skipped": runner._skipped.item(), "ddp": engine.ddp is not None},
               Path(out) / f"result{rank}.pt")
    dist.destroy_process_group()


def test_ddp_replicas_stay_identical_and_only_rank0_writes_shared_files(tmp_path: Path) -> None:
    from difflm.data import prepare_data
    from orchestrator.spec.run import RunSpec

    cache = tmp_path / "cache"
    spec = RunSpec.model_validate({**SPEC, "data": {**SPEC["data"], "cache_dir": str(cache)}})
    prepare_data(spec.data, spec.tokenizer, log=lambda _: None)  # tokenize once, before the two ranks read it
    mp.spawn(_worker, args=(2, free_port(), str(cache), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt") for r in (0, 1))
    assert r0["ddp"] and r1["ddp"]
    s0, s1 = r0["snapshots"], r1["snapshots"]  # (5, P): before and after each of 4 steps
    assert torch.equal(s0, s1)  # the same weights on both ranks after every step
    moved = [(s0[i + 1] - s0[i]).abs().max().item() for i in range(4)]
    assert moved[0] > 0 and moved[1] > 0 and moved[3] > 0
    assert moved[2] == 0.0  # rank 1's inf loss at step 3 skipped the update on both ranks
    assert r0["skipped"] == r1["skipped"] == 1.0
    ck0, ck1 = tmp_path / "rank0", tmp_path / "rank1"
    assert {"engine_state.pt", "model.safetensors", "spec.yaml", "trainer_state.json"} <= {p.name for p in ck0.iterdir()}
    files1 = sorted(p.relative_to(ck1).as_posix() for p in ck1.rglob("*") if p.is_file())
    assert files1 == ["manifest/rank1.json", "rng/rank1.pt"]  # per-rank files only: nothing shared from rank 1
