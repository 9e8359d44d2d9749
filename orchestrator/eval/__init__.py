"""Evaluation beyond the val NLL, in-process (no Ray): judges, generative perplexity, MAUVE, export, lm-eval.

:mod:`orchestrator.eval.judge` loads a scorer LM (a difflm ``ar`` run or a local Hugging Face causal LM),
:mod:`orchestrator.eval.genppl` samples a run and scores the samples (gen-PPL, entropy, frontier),
:mod:`orchestrator.eval.mauve` compares samples with held-out text, :mod:`orchestrator.eval.export`
writes a self-contained model folder and :mod:`orchestrator.eval.lm_eval` is the lm-evaluation-harness model.
"""
