"""Tokenizers: a built-in byte-level one and a wrapper around local HF `tokenizers` files.

Both expose the same small interface, which is all the data path and the
evaluator use:

    encode(text) -> list[int]            no special tokens added
    encode_batch(texts) -> list[list[int]]
    decode(ids) -> str                   special tokens dropped
    vocab_size, bos_id, eos_id, pad_id   ints (bos_id may be None)
    fingerprint                          str, changes when the vocabulary does

`load_tokenizer("byte")` or `load_tokenizer("/path/to/tokenizer.json")` (or a
folder holding `tokenizer.json`). Nothing is ever downloaded.

Example:
    >>> tok = load_tokenizer("byte")
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode([tok.bos_id, 104, 195, 169, tok.eos_id])
    'hé'
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then three specials.

    ids: 0..255 raw bytes, 256 = bos, 257 = eos, 258 = pad; vocab_size = 259.
    The model may round its embedding table up (e.g. to a multiple of 64); ids
    >= 259 never occur in data. `decode` drops specials and replaces invalid
    UTF-8 (a window cut in the middle of a multi-byte character) with U+FFFD.
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


# Common spellings of special tokens, most specific first.
_BOS_CANDIDATES = ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "[BOS]")
_EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_ADDED_EOS = "<|endoftext|>"


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a local tokenizer.json.

    Specials are found by name (override with bos/eos/pad token strings):
      bos: one of <|begin_of_text|>, <|startoftext|>, <s>, <bos>, [BOS]; else None
           (documents then start without a bos token).
      eos: one of <|end_of_text|>, <|endoftext|>, </s>, <eos>, [EOS]; if none
           exists, "<|endoftext|>" is added as a special token (vocab_size + 1),
           because packing needs a document separator.
      pad: one of <pad>, [PAD], <|pad|>, <|padding|>; else pad_id = eos_id.
    `encode` never adds the file's post-processor specials (e.g. BERT's [CLS]);
    the packer adds bos/eos itself.
    """

    def __init__(self, path: str, bos: Optional[str] = None, eos: Optional[str] = None,
                 pad: Optional[str] = None):
        from tokenizers import Tokenizer as _RustTokenizer

        path = _resolve_tokenizer_file(path)
        self.path = path
        try:
            self._tok = _RustTokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception for a junk file
            raise ValueError(f"tokenizer file {path} cannot be read as a Hugging Face tokenizer.json "
                             f"({str(e).strip() or type(e).__name__})") from None
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]

        self.bos_id = self._find(bos, _BOS_CANDIDATES, "bos")
        self.eos_id = self._find(eos, _EOS_CANDIDATES, "eos")
        if self.eos_id is None:
            self._tok.add_special_tokens([_ADDED_EOS])
            self.eos_id = self._tok.token_to_id(_ADDED_EOS)
        pad_id = self._find(pad, _PAD_CANDIDATES, "pad")
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = f"hf-{digest}-{self.vocab_size}"

    def _find(self, explicit: Optional[str], candidates: tuple[str, ...], role: str) -> Optional[int]:
        if explicit is not None:
            tid = self._tok.token_to_id(explicit)
            if tid is None:
                raise ValueError(f"tokenizer {self.path}: {role} token {explicit!r} is not in the vocabulary")
            return tid
        for name in candidates:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return tid
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids of text (no specials added) and the index of each token's first character."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [a for a, _ in enc.offsets]

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def _resolve_tokenizer_file(path: str) -> str:
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"tokenizer folder {path} has no tokenizer.json")
        return candidate
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer not found: {path} (expected 'byte', a tokenizer.json file or a folder holding one)")
    return path


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """"byte" -> ByteTokenizer; a local file or folder -> HFTokenizer.

    Raises FileNotFoundError (one line, naming the path) when the path does not exist.
    """
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(os.path.expanduser(spec))
