"""lm-evaluation-harness model ``difflm``: multiple-choice and generation tasks on any difflm run.

    python -m orchestrator.eval.lm_eval --model difflm --model_args run=runs/q,mc_samples=32 --tasks arc_easy

``python -m orchestrator.eval.lm_eval`` registers the model and runs lm-eval's own CLI (lm-eval 0.4
has no plugin entry point for models; ``register()`` does the same for ``lm_eval.simple_evaluate``).
lm-eval is an optional dependency (``pip install 'difflm[eval]'``) and imported only here, lazily.

* ``loglikelihood(context, continuation)``: :func:`difflm.metrics.loglik.continuation_logprob`, exact
  for ar, for diffusion families minus the mean of ``mc_samples`` NELBO draws of the continuation
  given the clean context (a lower bound on log p; the same noise for every option of a question).
  ``is_greedy`` is not computed (always False): lambada-style accuracy needs an exact argmax.
* ``loglikelihood_rolling(text)``: the text in chunks of seq_len - 1 tokens, each given up to half a
  window of earlier text (:func:`difflm.metrics.loglik.rolling_windows`), summed.
* ``generate_until(context, {until, max_gen_toks, temperature})``: the family's default sampler with
  ``[BOS] + context`` as a fixed prefix, cut at the first EOS and the first stop string.
A request longer than the model's seq_len raises :class:`difflm.metrics.loglik.TooLongError` naming
both lengths (never a silent truncation).
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import torch

from difflm.metrics.loglik import TooLongError, continuation_logprob, rolling_windows


class DifflmHarnessModel:
    """The maths of the harness model on a loaded checkpoint, without lm-eval (unit-testable)."""

    def __init__(self, run: str | None = None, mc_samples: int | str = 32, seed: int | str = 0, steps: int | str | None = None,
                 device: str = "cpu", ckpt: Any = None, **_: Any) -> None:
        from orchestrator.rundir.checkpoints import load_checkpoint

        if ckpt is None:
            if run is None:
                raise ValueError("model_args needs run=RUN_OR_CHECKPOINT")
            ckpt = load_checkpoint(run, device or "cpu")
        self.ckpt = ckpt
        self.model, self.tok, self.spec = ckpt.model, ckpt.tokenizer, ckpt.spec
        self.max_len = int(self.spec.data.seq_len)
        self.mc_samples = 1 if self.model.exact_likelihood else int(mc_samples)
        self.seed = int(seed)
        self.steps = int(steps) if steps is not None else self.spec.diffusion.steps_for(self.spec.data.seq_len)
        self.calls = 0

    def _loglik(self, context: list[int], continuation: list[int], index: int) -> float:
        return continuation_logprob(self.model, context, continuation, bos_id=self.tok.bos_id, max_len=self.max_len,
                                    samples=self.mc_samples, seed=self.seed, index=index).logprob

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx_ids = self.tok.encode(context) if context else []
            cont_ids = self.tok.encode(continuation)
            # common random numbers per context: every answer option of a question gets the same noise
            index = zlib.crc32(context.encode("utf-8")) & 0x7FFFFFFF
            out.append((self._loglik(ctx_ids, cont_ids, index), False))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for i, req in enumerate(requests):
            ids = self.tok.encode(req.args[0])
            total = 0.0
            for j, (start, first, end) in enumerate(rolling_windows(len(ids), self.max_len)):
                total += self._loglik(ids[start:first], ids[first:end], (i << 16) + j)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from difflm.sampling import SampleOptions, get_sampler

        fn = get_sampler(self.model, self.model.default_sampler)
        out = []
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", 64))
            prompt = ([self.tok.bos_id] if self.tok.bos_id is not None else []) + self.tok.encode(context)
            if len(prompt) >= self.max_len:
                raise TooLongError(f"generation prompt of {len(prompt)} tokens (with BOS) leaves no room in the "
                                   f"model's seq_len {self.max_len}; shorten the task's context")
            length = min(self.max_len, len(prompt) + max_gen)
            template = torch.zeros(length, dtype=torch.long)
            template[: len(prompt)] = torch.tensor(prompt)
            fixed = torch.zeros(length, dtype=torch.bool)
            fixed[: len(prompt)] = True
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            options = SampleOptions(num=1, length=length, steps=self.steps, temperature=temperature,
                                    template=template, fixed=fixed, window=self.max_len)
            gen = torch.Generator(device=self.ckpt.device).manual_seed(self.seed + i)
            with torch.no_grad():
                res = fn(options, gen)
            new = res.tokens[0, len(prompt):].tolist()
            if self.tok.eos_id is not None and self.tok.eos_id in new:
                new = new[: new.index(self.tok.eos_id)]
            text = self.tok.decode(new)
            cuts = [text.index(s) for s in until if s and s in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out


def register() -> type:
    """Register ``difflm`` in lm-eval's model registry (imports lm-eval); returns the class."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise SystemExit("lm-eval is not installed: pip install 'difflm[eval]' (or pip install lm-eval)") from None

    class DifflmLM(DifflmHarnessModel, LM):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            LM.__init__(self)
            DifflmHarnessModel.__init__(self, **kwargs)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DifflmLM:
            from lm_eval.utils import simple_parse_args_string

            args = simple_parse_args_string(arg_string)
            device = (additional_config or {}).get("device")
            # model_args' device wins; lm-eval's own --device defaults to cuda:0 even on a machine without
            # CUDA, so that default falls back to auto (mps or cpu) with a note instead of a CUDA traceback
            if "device" not in args and device is not None:
                if str(device).startswith("cuda") and not torch.cuda.is_available():
                    print(f"difflm: lm-eval asked for device {device}, but no CUDA device is visible; using auto "
                          "(pass --device cpu|mps or model_args device=... to choose)", file=sys.stderr)
                    device = "auto"
                args["device"] = device
            return cls(**args)

    return register_model("difflm")(DifflmLM)


def main() -> None:
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
