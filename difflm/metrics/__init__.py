"""Sample-quality and held-out metrics that need no checkpoint loading: pure maths on token ids and log-probs.

:mod:`difflm.metrics.genppl` (generative perplexity, unigram entropy, judge windows) and
:mod:`difflm.metrics.loglik` (log-likelihood of a continuation given a context, for lm-eval-harness).
"""
