"""Tokenizers: byte, trained BPE (with its cache), and Hugging Face tokenizers from a local folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from difflm.data import DataError, TokenizerConfig, build_tokenizer, load_tokenizer
from difflm.data import tokenization
from difflm.data.sources import builtin_documents
from difflm.data.tokenization import BPETokenizer, ByteTokenizer, HFTokenizer, train_bpe

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 😀!",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "zebra-quokka xylophone qwertyuiop",  # rare words: BPE falls back to bytes
    "",
]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """A slice of the built-in corpus: enough text to fill a 600-entry BPE vocabulary."""
    return builtin_documents()[:400]


@pytest.fixture(scope="module")
def bpe(docs: list[str]) -> BPETokenizer:
    return train_bpe(docs, 600)


# ----------------------------------------------------------------------------- byte


def test_byte_tokenizer_ids_and_specials() -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    assert tok.encode("Az\n") == [65, 122, 10]
    assert tok.encode("é") == [0xC3, 0xA9]  # UTF-8 bytes, not code points
    assert tok.encode_batch(["a", "", "bc"]) == [[97], [], [98, 99]]


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == text
    assert tok.decode([259, *ids, 300]) == text  # out-of-vocabulary ids (a mask id) are skipped


def test_byte_tokenizer_decodes_broken_utf8_with_replacement() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1] + tok.encode("x")  # half a two-byte character, as a model may emit
    assert tok.decode(ids) == "\ufffdx"


def test_byte_tokenizer_save_load(tmp_path: Path) -> None:
    ByteTokenizer().save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert isinstance(tok, ByteTokenizer)
    assert tok.vocab_size == 259
    assert build_tokenizer(TokenizerConfig(kind="byte"), [], tmp_path).vocab_size == 259


# ----------------------------------------------------------------------------- BPE


def test_bpe_vocab_and_specials(bpe: BPETokenizer, docs: list[str]) -> None:
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 600  # the corpus is large enough to fill the requested size
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    ids = [i for ids in bpe.encode_batch(docs[:50]) for i in ids]
    assert max(ids) < bpe.vocab_size
    assert not {0, 1, 2} & set(ids)  # text never encodes to a special id
    n_bytes = sum(len(d.encode()) for d in docs[:50])
    assert len(ids) < 0.6 * n_bytes  # merges learned: clearly shorter than bytes


def test_bpe_never_exceeds_vocab_size_on_tiny_corpus() -> None:
    tok = train_bpe(["tiny corpus", "two docs"], 5000)
    assert 259 <= tok.vocab_size < 5000  # 256 byte symbols + 3 specials + the few merges there are


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.decode([bpe.bos_id, *ids, bpe.eos_id, bpe.pad_id]) == text
    assert bpe.decode([600, *ids, 601, -1]) == text  # out-of-vocabulary ids (a mask id) are skipped
    assert bpe.encode_batch([text, text]) == [ids, ids]


def test_bpe_save_load_round_trip(bpe: BPETokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == ("bpe", 600, 0, 1, 2)
    for text in SAMPLES:
        assert tok.encode(text) == bpe.encode(text)


def test_bpe_folder_loads_with_transformers(bpe: BPETokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    bpe.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (0, 1, 2, 600)
    assert hf(SAMPLES[1], add_special_tokens=False)["input_ids"] == bpe.encode(SAMPLES[1])
    as_hf = build_tokenizer(TokenizerConfig(kind="hf", name=str(tmp_path / "tok")), [], tmp_path)
    assert as_hf.encode(SAMPLES[0]) == bpe.encode(SAMPLES[0]) and as_hf.eos_id == 1


def test_special_token_text_inside_documents_stays_text(bpe: BPETokenizer, tmp_path: Path) -> None:
    text = "a document quoting <|eos|> and <|bos|> literally"
    ids = bpe.encode(text)
    assert not set(ids) & {0, 1, 2}
    assert bpe.decode(ids) == text
    bpe.save(tmp_path / "tok")
    hf = build_tokenizer(TokenizerConfig(kind="hf", name=str(tmp_path / "tok")), [], tmp_path)
    assert hf.encode(text) == ids


def test_bpe_is_cached_not_retrained(docs: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = tokenization.train_bpe

    def counting(train_docs: list[str], vocab_size: int) -> BPETokenizer:
        calls.append(vocab_size)
        return real(train_docs, vocab_size)

    monkeypatch.setattr(tokenization, "train_bpe", counting)
    cfg = TokenizerConfig(kind="bpe", vocab_size=400)
    first = build_tokenizer(cfg, docs[:100], tmp_path)
    second = build_tokenizer(cfg, docs[:100], tmp_path)
    assert calls == [400]
    assert second.encode(SAMPLES[1]) == first.encode(SAMPLES[1])
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("bpe-400-")
    assert not [p for p in (tmp_path / "tokenizers").iterdir() if p.name.startswith(".tmp")]
    build_tokenizer(cfg, docs[:101], tmp_path)  # other documents: retrain
    build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=420), docs[:100], tmp_path)  # other size
    assert calls == [400, 400, 420]


# ----------------------------------------------------------------------------- Hugging Face


def _fast(bpe: BPETokenizer, **specials: str):  # -> PreTrainedTokenizerFast
    """A transformers fast tokenizer on the trained BPE model with the given special tokens only."""
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer.from_str(bpe.rust.to_str())  # a copy: never mutate the fixture
    return PreTrainedTokenizerFast(tokenizer_object=rust, clean_up_tokenization_spaces=False, **specials)


def test_hf_tokenizer_from_local_folder(bpe: BPETokenizer, tmp_path: Path) -> None:
    fast = _fast(bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.save_pretrained(str(tmp_path / "hf"))  # a plain transformers folder, as save_pretrained writes it
    tok = build_tokenizer(TokenizerConfig(kind="hf", name=str(tmp_path / "hf")), [], tmp_path)
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == ("hf", 600, 0, 1, 2)
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text) == bpe.encode(text)
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert (again.kind, again.vocab_size, again.bos_id, again.eos_id) == ("hf", 600, 0, 1)


def test_hf_gpt2_style_eos_only_reuses_eos(bpe: BPETokenizer) -> None:
    tok = HFTokenizer(_fast(bpe, eos_token="<|eos|>"), "hf")
    assert tok.bos_id == tok.eos_id == tok.pad_id == 1
    assert tok.vocab_size == 600  # nothing added
    assert tok.decode([1, *tok.encode("hello there"), 1, 1]) == "hello there"


def test_hf_bert_style_uses_cls_and_sep(bpe: BPETokenizer) -> None:
    tok = HFTokenizer(_fast(bpe, cls_token="<|bos|>", sep_token="<|eos|>", pad_token="<|pad|>"), "hf")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.encode("hi") == bpe.encode("hi")  # the tokenizer's own [CLS]/[SEP] are not added


def test_hf_without_specials_adds_eos_token(bpe: BPETokenizer, tmp_path: Path) -> None:
    tok = HFTokenizer(_fast(bpe), "hf")
    assert tok.vocab_size == 601 and tok.eos_id == 600
    assert tok.bos_id == tok.pad_id == 600
    tok.save(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert (again.vocab_size, again.eos_id) == (601, 600)


def test_hf_tokenizer_unreachable_hub_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transformers

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(DataError, match=r"(?s)could not load tokenizer 'gpt2'.*hub could not be reached.*local path"):
        build_tokenizer(TokenizerConfig(kind="hf", name="gpt2"), [], tmp_path)


def test_hf_tokenizer_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="looks like a local path but does not exist"):
        build_tokenizer(TokenizerConfig(kind="hf", name=str(tmp_path / "nope")), [], tmp_path)


def test_load_tokenizer_from_folder_without_metadata(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="difflm_tokenizer.json missing"):
        load_tokenizer(tmp_path)
