"""Data and tokenizer sub-configs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from difflm._config import StrictModel


class DataConfig(StrictModel):
    """Where the text comes from and how it is packed into training blocks."""

    source: Literal["builtin", "text", "jsonl", "parquet", "hf"] = Field(
        "builtin",
        description="builtin: the offline corpus shipped with difflm; text: a .txt file or a folder of them; "
        "jsonl/parquet: records with a text field; hf: a Hugging Face dataset by name (or a local dataset dir).",
    )
    path: str | None = Field(
        None, description="File or folder for text/jsonl/parquet; dataset name or local dir for hf."
    )
    hf_config: str | None = Field(None, description="Hugging Face dataset config, e.g. wikitext-2-raw-v1.")
    hf_split: str = Field("train", description="Hugging Face split to read; difflm makes its own train/val split.")
    text_field: str = Field("text", description="Field holding the text in jsonl/parquet/hf records.")
    seq_len: int = Field(128, ge=8, le=65536, description="Tokens per packed block (BOS ... EOS wrapped).")
    val_fraction: float = Field(
        0.05, gt=0.0, lt=0.5,
        description="Chance that a document is held out for validation, decided per document from a hash of "
        "its index and split_seed (streamable, the same on every node).",
    )
    split_seed: int = Field(0, ge=0, description="Seed of the deterministic document-level train/val split.")
    val_tokens: int | None = Field(
        None, ge=8,
        description="Cap on validation tokens: the val blocks are the first val_tokens // (seq_len - 2) (at least "
        "1). Keeps validation small and fixed on huge corpora; applied when packing, so changing it re-tokenizes "
        "nothing.",
    )
    chunk_chars: int = Field(
        8_000_000, ge=1000, le=1_000_000_000,
        description="Characters of text per preparation chunk (one token shard per chunk and split). Sets the "
        "working set: each tokenizing process holds about 3x this in memory (text + ids), the driver "
        "(num_proc + 1) chunks in flight.",
    )
    num_proc: int | Literal["auto"] = Field(
        "auto",
        description="Processes that tokenize chunks in parallel. auto = 1 process whose Rust tokenizer "
        "(bpe, hf) spreads encode_batch over every CPU with its own threads, measured faster than one process "
        "per core on 2 cores (docs/benchmarks.md); N = N processes of one thread each. Does not change the result.",
    )
    bad_records: Literal["error", "skip"] = Field(
        "error",
        description="A jsonl line that is not a JSON object, or a text/jsonl line that is not UTF-8: error "
        "(stop, naming file and line) or skip (count them, report them in the log and the cache's index).",
    )
    max_documents: int | None = Field(None, ge=2, description="Read at most this many documents (quick runs).")
    cache_dir: str = Field(".difflm_cache", description="Where tokenized data and trained tokenizers are cached.")

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.source != "builtin" and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


class TokenizerConfig(StrictModel):
    """How text becomes token ids."""

    kind: Literal["byte", "bpe", "hf"] = Field(
        "byte",
        description="byte: built-in byte-level (256 + specials); bpe: trained with `tokenizers` on the train "
        "split and cached; hf: any Hugging Face tokenizer by name or local path.",
    )
    vocab_size: int = Field(4096, ge=300, le=262144, description="Target vocab size of a trained BPE tokenizer.")
    name: str | None = Field(None, description="Hugging Face tokenizer name or path (kind: hf), e.g. gpt2.")
    train_sample_bytes: int = Field(
        64_000_000, ge=10_000,
        description="kind bpe: train on the first documents of the train split up to this many UTF-8 bytes "
        "(the sample bounds training time and memory on huge corpora; ~64 MB gives a stable vocabulary).",
    )

    @model_validator(mode="after")
    def _name_needed(self) -> "TokenizerConfig":
        if self.kind == "hf" and not self.name:
            raise ValueError("tokenizer.name is required when tokenizer.kind is 'hf' (e.g. gpt2)")
        return self
