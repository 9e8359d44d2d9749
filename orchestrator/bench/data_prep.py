"""Data preparation throughput against the tokenizer's own ``encode_batch`` (docs/benchmarks.md).

    python -m orchestrator.bench.data_prep --text /work/shared/data/wikitext-2/valid.txt --mb 100 --out /tmp/dp

Builds a corpus of ``--mb`` MB by repeating ``--text`` (once per size, kept in ``--out``), trains
(or reuses) a BPE on a small sample, then measures in fresh subprocesses, one at a time:

limit-1   the Rust tokenizer's ``encode_batch`` on the same documents, one thread
          (``TOKENIZERS_PARALLELISM=false``): the per-core limit
limit-N   the same with its Rust thread pool (every core)
np=N      ``prepare_tokens`` with N processes (each one thread): read, split, tokenize, write shards
np=1      ``prepare_tokens`` in one process, the Rust thread pool doing the parallelism

Each line: wall seconds, tokens/s, tokens/s per core, and peak RSS of the driver and of its
largest child (VmHWM / RUSAGE_CHILDREN), so growth with the corpus shows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_CHILD = r"""
import json, os, re, resource, sys, time
mode, corpus, cache, vocab, np_ = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from difflm.data import DataConfig, TokenizerConfig
from difflm.data.pipeline import prepare_tokens, read_index
from difflm.data.sources import iter_documents
cfg = DataConfig(source="text", path=corpus, cache_dir=cache, num_proc=np_)
tok = TokenizerConfig(kind="bpe", vocab_size=vocab, train_sample_bytes=4_000_000)
open("/proc/self/clear_refs", "w").write("5")
t0 = time.perf_counter()
if mode == "limit":
    from difflm.data.tokenization import load_tokenizer
    tdir = sys.argv[6]
    rust = load_tokenizer(os.path.join(tdir, "tokenizer")).rust
    batch, tokens = [], 0
    for doc in iter_documents(cfg):
        batch.append(doc)
        if len(batch) == 1024:
            tokens += sum(len(e.ids) for e in rust.encode_batch(batch, add_special_tokens=False)); batch = []
    if batch:
        tokens += sum(len(e.ids) for e in rust.encode_batch(batch, add_special_tokens=False))
else:
    tdir = prepare_tokens(cfg, tok, log=lambda m: None)
    idx = read_index(tdir)
    tokens = idx["train_tokens"] + idx["val_tokens"] - idx["documents"]  # text tokens, EOS not counted
wall = time.perf_counter() - t0
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"wall": wall, "tokens": tokens, "rss_mb": hwm, "child_rss_mb": child}))
"""


def _run(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True)
    ap.add_argument("--mb", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--modes", default="limit-1,limit-N,np=N,np=1")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / f"corpus-{a.mb}mb.txt"
    if not corpus.exists():
        text = Path(a.text).read_bytes()
        with open(corpus, "wb") as f:
            for _ in range(max(1, a.mb * 1_000_000 // len(text))):
                f.write(text)
    size = corpus.stat().st_size
    env = dict(os.environ)
    # the tokenizer (trained on a 4 MB sample) and its folder, reused by the limit runs
    warm = out / "cache-warm"
    _run(["prep", str(corpus), str(warm), str(a.vocab), "1"], env) if not (warm / "tokens").exists() else None
    tdir = next((warm / "tokens").iterdir())
    print(f"corpus {corpus} {size / 1e6:.0f} MB, {cores} cores, BPE {a.vocab}, {time.strftime('%Y-%m-%d %H:%M')} UTC")
    for mode in a.modes.split(","):
        e = dict(env)
        if mode == "limit-1":
            e["TOKENIZERS_PARALLELISM"] = "false"
            r, used = _run(["limit", str(corpus), str(warm), str(a.vocab), "1", str(tdir)], e), 1
        elif mode == "limit-N":
            r, used = _run(["limit", str(corpus), str(warm), str(a.vocab), "1", str(tdir)], e), cores
        else:
            n = cores if mode == "np=N" else 1
            cache = out / f"cache-{mode}"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(warm / "tokenizers", cache / "tokenizers")  # the trained BPE: time tokenization only
            r, used = _run(["prep", str(corpus), str(cache), str(a.vocab), str(n)], e), cores if n == 1 else n
            shutil.rmtree(cache, ignore_errors=True)
        tps = r["tokens"] / r["wall"]
        print(f"{mode:8s} {r['wall']:7.1f} s  {r['tokens'] / 1e6:7.1f} M tokens  {tps / 1e6:6.3f} M tok/s  "
              f"{tps / used / 1e6:6.3f} M tok/s/core ({used} cores)  {size / 1e6 / r['wall']:5.1f} MB/s  "
              f"peak RSS {r['rss_mb']:.0f} MB (largest child {r['child_rss_mb']:.0f} MB)", flush=True)


if __name__ == "__main__":
    main()
