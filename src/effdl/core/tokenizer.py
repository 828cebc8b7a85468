"""Tokenizers: the byte-level default for models we train, and HF ``tokenizer.json`` files.

Both expose the same small interface (``encode``, ``decode``, ``vocab_size``,
``bos_id``, ``eos_id``, ``save``). A ``ByteTokenizer`` saves itself as a real
``tokenizer.json`` (byte-level BPE with no merges), so checkpoints we write are
read by ``transformers``' ``AutoTokenizer`` and by other servers unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from effdl.core.config import BYTE_VOCAB_SIZE
from effdl.errors import EffdlError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, folder: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then ``<|bos|>`` = 256 and ``<|eos|>`` = 257."""

    vocab_size = BYTE_VOCAB_SIZE
    bos_id = 256
    eos_id = 257
    special_tokens = ("<|bos|>", "<|eos|>")
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of the byte ids; special ids are dropped, and a split multi-byte character becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, folder: str | Path) -> None:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTok

        byte_chars = _bytes_to_unicode()
        tok = HFTok(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.special_tokens])
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tok.save(str(folder / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.special_tokens[0],
            "eos_token": self.special_tokens[1],
            "add_bos_token": False,
            "model_max_length": 1 << 30,
        }
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (any BPE/Unigram/WordPiece model)."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTok

        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        try:
            self._tok = HFTok.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise EffdlError(f"cannot read {path}: {e}") from None
        config_path = folder / TOKENIZER_CONFIG_FILE
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.bos_id = self._special_id(config.get("bos_token"))
        self.eos_id = self._special_id(config.get("eos_token"))
        self.chat_template: str | None = config.get("chat_template")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._folder = folder

    def _special_id(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / TOKENIZER_FILE))
        source_config = self._folder / TOKENIZER_CONFIG_FILE
        if source_config.is_file() and source_config.resolve() != (folder / TOKENIZER_CONFIG_FILE).resolve():
            (folder / TOKENIZER_CONFIG_FILE).write_text(source_config.read_text())


def load_tokenizer(folder: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """The checkpoint folder's ``tokenizer.json``; with none, the byte tokenizer if the vocabulary fits it."""
    folder = Path(folder)
    if (folder / TOKENIZER_FILE).is_file():
        return HFTokenizer(folder)
    if vocab_size is None or vocab_size == BYTE_VOCAB_SIZE:
        return ByteTokenizer()
    raise EffdlError(
        f"{folder} has no {TOKENIZER_FILE} and its vocabulary ({vocab_size}) is not the byte tokenizer's "
        f"({BYTE_VOCAB_SIZE}); copy the model's tokenizer.json into the folder"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE files."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
