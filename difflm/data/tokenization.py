"""Tokenizers: text <-> ids, with the three special ids packing needs (BOS, EOS, PAD).

(The module is ``tokenization`` so it never shadows the ``tokenizers`` library.)

Kinds:

byte
    Built in, no files: ids 0..255 are the UTF-8 bytes, then BOS=256, EOS=257,
    PAD=258 (vocab 259). Decoding skips specials and replaces invalid UTF-8
    (a model may emit half a multi-byte character).
bpe
    Byte-level BPE trained with the ``tokenizers`` library on the *train* documents
    only (so validation text never shapes the vocabulary), ``vocab_size`` entries
    at most (a tiny corpus may yield fewer), specials ``<|bos|>``=0, ``<|eos|>``=1,
    ``<|pad|>``=2. Used through ``tokenizers`` directly (no ``transformers`` import,
    which costs seconds in every worker); its folder holds ``tokenizer.json`` and a
    ``tokenizer_config.json``, so ``AutoTokenizer.from_pretrained(folder)`` also
    loads it (and ``kind: hf`` with that path). The trained tokenizer is cached
    under ``<cache_dir>/tokenizers/bpe-<vocab>-<hash>`` where the hash covers the
    train documents and vocab size: a second run, or another ``seq_len``, reuses it.
hf
    ``transformers.AutoTokenizer.from_pretrained(name)``, a hub name or a local
    folder. Specials are taken from the tokenizer, and filled in when missing:
    BOS = bos, else cls (BERT's ``[CLS]``), else EOS; EOS = eos, else sep (BERT's
    ``[SEP]``), else a new ``<|endoftext|>`` token; PAD = pad, else EOS. So GPT-2
    (eos only) gets BOS = EOS = PAD = ``<|endoftext|>``; BERT gets [CLS]/[SEP]/[PAD].
    Text is encoded without the tokenizer's own special tokens (packing adds
    BOS/EOS itself). ``vocab_size`` is ``len(tokenizer)``, which counts added tokens.

Special-token strings that occur in the text itself (a document quoting
``<|endoftext|>``) are encoded as ordinary text (``encode_special_tokens``), so the
only BOS/EOS ids in packed data are the ones packing inserts. (Slow, non-Rust
``hf`` tokenizers do not support this and still map them to the special id.)

``decode`` always drops BOS/EOS/PAD and ids outside the vocabulary (a sampler's
leftover mask id). ``save(dir)`` writes ``difflm_tokenizer.json``
(kind and special ids) plus the library's files; :func:`load_tokenizer` reads it
back, which is how worker processes get the exact tokenizer the data was built with.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difflm.data.config import TokenizerConfig
from difflm.data.errors import DataError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "train_bpe",
    "bpe_cache_path",
    "META_FILE",
]

META_FILE = "difflm_tokenizer.json"
BPE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")


class Tokenizer(ABC):
    """What the data pipeline, trainers and samplers need from a tokenizer."""

    kind: str = ""
    # Set by each subclass (class attributes or in __init__); read through the properties below.
    _vocab: int
    _bos: int
    _eos: int
    _pad: int

    @property
    def vocab_size(self) -> int:
        """Number of ids (max id + 1), specials included: the embedding size a model needs."""
        return self._vocab

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def unk_id(self) -> int | None:
        """The unknown-token id, or None when every text is representable (byte-level tokenizers)."""
        return None

    @property
    def special_ids(self) -> frozenset[int]:
        """BOS, EOS and PAD (some may coincide, e.g. GPT-2)."""
        return frozenset((self.bos_id, self.eos_id, self.pad_id))

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, without BOS/EOS."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text; subclasses override with a faster batched path."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; BOS/EOS/PAD and ids outside the vocabulary (e.g. a diffusion mask id) are skipped."""

    def _kept(self, ids: Sequence[int]) -> list[int]:
        specials, n = self.special_ids, self.vocab_size
        return [int(i) for i in ids if 0 <= int(i) < n and int(i) not in specials]

    @abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the tokenizer to ``directory`` (created) so :func:`load_tokenizer` restores it."""

    def _write_meta(self, directory: Path, extra: dict[str, Any] | None = None) -> None:
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, **(extra or {})}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes plus three specials: needs no training, no files, covers every text."""

    kind = "byte"
    BOS, EOS, PAD = 256, 257, 258
    _vocab, _bos, _eos, _pad = 259, BOS, EOS, PAD

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._write_meta(d)


class BPETokenizer(Tokenizer):
    """A byte-level BPE from the ``tokenizers`` library with specials ``<|bos|>``, ``<|eos|>``, ``<|pad|>``."""

    kind = "bpe"

    def __init__(self, rust: Any) -> None:
        """Wrap a ``tokenizers.Tokenizer`` that has the three BPE special tokens."""
        ids = [rust.token_to_id(t) for t in BPE_SPECIALS]
        if None in ids:
            raise DataError(f"BPE tokenizer lacks special tokens {BPE_SPECIALS}; rebuild it (delete its folder)")
        self.rust = rust
        self.rust.encode_special_tokens = True  # "<|eos|>" written in a document is text, not EOS
        self._bos, self._eos, self._pad = ids
        self._vocab = rust.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, directory: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer as RustTokenizer

        return cls(RustTokenizer.from_file(str(directory / "tokenizer.json")))

    def encode(self, text: str) -> list[int]:
        return list(self.rust.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.rust.encode_batch(list(texts), add_special_tokens=False)] if texts else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.rust.decode(self._kept(ids), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.rust.save(str(d / "tokenizer.json"))
        # What transformers' save_pretrained would write, so AutoTokenizer.from_pretrained(d) works too.
        hf_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BPE_SPECIALS[0],
                     "eos_token": BPE_SPECIALS[1], "pad_token": BPE_SPECIALS[2],
                     "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000}
        (d / "tokenizer_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        self._write_meta(d)


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer (kind ``hf``) with resolved BOS/EOS/PAD."""

    def __init__(self, hf: Any, kind: str = "hf", bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None) -> None:
        """Wrap ``hf``; ids not given are resolved from its special tokens (see module docstring)."""
        self.hf = hf
        self.kind = kind
        if eos_id is None:
            eos_id = hf.eos_token_id if hf.eos_token_id is not None else getattr(hf, "sep_token_id", None)
        if eos_id is None:
            hf.add_special_tokens({"eos_token": "<|endoftext|>"})
            eos_id = hf.eos_token_id
        if bos_id is None:
            bos_id = hf.bos_token_id if hf.bos_token_id is not None else getattr(hf, "cls_token_id", None)
        if bos_id is None:
            bos_id = eos_id
        if pad_id is None:
            pad_id = hf.pad_token_id if hf.pad_token_id is not None else eos_id
        self._bos, self._eos, self._pad = int(bos_id), int(eos_id), int(pad_id)
        self._vocab = len(hf)
        # Fast tokenizers: encode through the Rust backend directly (batched, parallel, and no
        # "sequence longer than model_max_length" warnings for long documents).
        self._backend = getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None
        if self._backend is not None:
            self._backend.encode_special_tokens = True  # "<|endoftext|>" inside a document is text

    @property
    def unk_id(self) -> int | None:
        unk = getattr(self.hf, "unk_token_id", None)
        return int(unk) if unk is not None else None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        out = self.hf(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [list(ids) for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(self._kept(ids), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(d))
        self._write_meta(d)


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer saved in ``directory`` by :meth:`Tokenizer.save`."""
    d = Path(directory)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise DataError(f"no saved difflm tokenizer in {str(d)!r} ({META_FILE} missing); "
                        "save one with Tokenizer.save(dir) or rebuild the data with prepare_data")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == "byte":
        return ByteTokenizer()
    if meta["kind"] == "bpe":
        return BPETokenizer.from_dir(d)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(d))
    tok = HFTokenizer(hf, meta["kind"], bos_id=meta["bos_id"], eos_id=meta["eos_id"], pad_id=meta["pad_id"])
    if tok.vocab_size != meta["vocab_size"]:
        raise DataError(f"tokenizer in {str(d)!r} has {tok.vocab_size} ids but was saved with "
                        f"{meta['vocab_size']}; the folder is corrupt, delete it and rebuild")
    return tok


def build_tokenizer(cfg: TokenizerConfig, train_docs: Sequence[str],
                    cache_dir: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer ``cfg`` describes; a ``bpe`` one is trained on ``train_docs`` or taken from cache."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "bpe":
        return _cached_bpe(train_docs, cfg.vocab_size, Path(cache_dir))
    assert cfg.name is not None  # TokenizerConfig enforces it for kind hf
    return _load_hf(cfg.name)


def _load_hf(name: str) -> HFTokenizer:
    from transformers import AutoTokenizer

    local = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not local.exists():
        raise DataError(f"tokenizer.name {name!r} looks like a local path but does not exist; "
                        "set it to a folder with tokenizer files or a hub name such as 'gpt2'")
    try:
        hf = AutoTokenizer.from_pretrained(str(local) if local.exists() else name)
    except (OSError, ValueError) as e:
        raise DataError(
            f"could not load tokenizer {name!r}: {e}. If the Hugging Face hub could not be reached "
            "(offline machine), save it elsewhere with AutoTokenizer.from_pretrained(name)."
            "save_pretrained(DIR), copy DIR here and set tokenizer.name to that local path; "
            "or use tokenizer.kind 'byte' or 'bpe'"
        ) from e
    return HFTokenizer(hf, "hf")


def bpe_cache_path(train_docs: Sequence[str], vocab_size: int, cache_dir: Path) -> Path:
    """Where the BPE trained on exactly these documents with this vocab size is cached."""
    h = hashlib.sha256(f"bpe-v1|{vocab_size}|{len(train_docs)}|".encode())
    for doc in train_docs:
        b = doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return cache_dir / "tokenizers" / f"bpe-{vocab_size}-{h.hexdigest()[:16]}"


def _cached_bpe(train_docs: Sequence[str], vocab_size: int, cache_dir: Path) -> Tokenizer:
    path = bpe_cache_path(train_docs, vocab_size, cache_dir)
    if (path / META_FILE).is_file():
        return load_tokenizer(path)
    tok = train_bpe(train_docs, vocab_size)
    # Save to a private temp folder, then rename: a concurrent process sees all or nothing.
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tok.save(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / META_FILE).is_file():
            raise
        return load_tokenizer(path)
    return tok


def train_bpe(train_docs: Sequence[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) with specials ids 0, 1, 2."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not train_docs:
        raise DataError("cannot train a BPE tokenizer on zero documents; check data.path")
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even unseen ones
        show_progress=False,
    )
    rust.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    return BPETokenizer(rust)
