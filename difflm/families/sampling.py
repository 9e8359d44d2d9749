"""Sampling helpers shared by the families' samplers (kept for imports; they live in :mod:`difflm.sampling.core`)."""

from __future__ import annotations

from difflm.sampling.core import adjust_log_probs, draw, sample_categorical

__all__ = ["sample_categorical", "adjust_log_probs", "draw"]
