import pytest

from effdl.core.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from effdl.errors import EffdlError

TEXTS = ["def f(x):\n    return x ** 2\n", "héllo wörld — ünïcödé ✓ 日本語 🙂", "", "  leading spaces\t\ttabs\r\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


def test_saved_tokenizer_json_agrees_with_byte_tokenizer(tmp_path):
    """The tokenizer.json we write, read by the `tokenizers` library, is the same tokenizer."""
    ByteTokenizer().save(tmp_path)
    hf = load_tokenizer(tmp_path)
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.vocab_size) == (256, 257, 258)
    for text in TEXTS:
        assert hf.encode(text) == ByteTokenizer().encode(text)
        assert hf.decode(hf.encode(text)) == text


def test_transformers_autotokenizer_reads_it(tmp_path):
    from transformers import AutoTokenizer

    ByteTokenizer().save(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto(TEXTS[1], add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(TEXTS[1])
    assert auto.eos_token_id == 257


def test_missing_tokenizer_for_non_byte_vocab(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, vocab_size=258), ByteTokenizer)
    with pytest.raises(EffdlError, match=r"has no tokenizer.json .*32000"):
        load_tokenizer(tmp_path, vocab_size=32000)


def test_malformed_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(EffdlError, match="cannot read"):
        load_tokenizer(tmp_path)
