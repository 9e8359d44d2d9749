"""`difflm eval RUN --mauve REF_FILE`: MAUVE (mauve-text) between samples and held-out text on judge features.

Reference documents are the non-empty lines of REF_FILE with at least ``min_words`` words (WikiText
keeps a paragraph per line), the first ``num`` of them; both sides are embedded by the same judge
(:meth:`orchestrator.eval.judge.HFJudge.features`). mauve-text is an optional dependency
(``pip install difflm[eval]``); its settings are printed with the score, because MAUVE moves with them
(number of k-means buckets, PCA, scaling factor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.errors import SpecError


def reference_texts(path: Path, num: int, min_words: int = 8) -> list[str]:
    """The first ``num`` lines of ``path`` with at least ``min_words`` words (SpecError when none)."""
    if not path.is_file():
        raise SpecError(f"--mauve {path}: no such file; give a held-out text file (one document per line)")
    docs = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if len(ln.split()) >= min_words and not ln.strip().startswith("=")]
    if len(docs) < 2:
        raise SpecError(f"--mauve {path}: fewer than 2 lines of {min_words}+ words; MAUVE needs a sample of documents")
    return docs[:num]


def mauve_score(p_features: Any, q_features: Any, seed: int = 25) -> tuple[float, dict[str, Any]]:
    """MAUVE of samples (p) vs references (q) and the settings used."""
    try:
        import mauve
    except ImportError:
        raise SpecError("--mauve needs mauve-text: pip install 'difflm[eval]' (or pip install mauve-text)") from None
    n = min(len(p_features), len(q_features))
    settings = {"num_buckets": max(2, n // 10), "pca_max_data": -1, "kmeans_explained_var": 0.9,
                "kmeans_num_redo": 5, "kmeans_max_iter": 500, "mauve_scaling_factor": 5,
                "divergence_curve_discretization_size": 25, "seed": seed, "p": len(p_features), "q": len(q_features)}
    out = mauve.compute_mauve(
        p_features=p_features, q_features=q_features, num_buckets=settings["num_buckets"], pca_max_data=-1,
        kmeans_explained_var=0.9, kmeans_num_redo=5, kmeans_max_iter=500, mauve_scaling_factor=5,
        divergence_curve_discretization_size=25, seed=seed, verbose=False,
    )
    return float(out.mauve), settings
