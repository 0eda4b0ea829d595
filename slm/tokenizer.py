"""GPT-2 byte-level BPE through tiktoken, built offline from the ranks file shipped in `slm/assets`.

`tiktoken.get_encoding("gpt2")` downloads its files; we build the same encoding from a bundled copy
whose sha256 is checked on load, so the tokenizer works without a network and cannot silently change.
"""

from __future__ import annotations

import codecs
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe

RANKS_PATH = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TEXT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenisation pattern (the same one tiktoken uses for "gpt2" and "r50k_base").
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer:
    """Text <-> token ids, plus the per-token views the playground shows."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.eot_id: int = encoding.eot_token
        self.vocab_size: int = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Encode text; a literal `<|endoftext|>` in it becomes the end-of-text token."""
        return self.encoding.encode(text, allowed_special={EOT_TEXT})

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with no special tokens (data preparation inserts end-of-text itself)."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Encode many texts in parallel (tiktoken releases the GIL), without special tokens."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def encode_documents(self, texts: Sequence[str], num_threads: int = 8) -> np.ndarray:
        """Every text's `encode_ordinary` ids followed by the end-of-text token, as one uint32 array:
        the stream training data is made of.

        The texts are joined by end-of-text into `num_threads` pieces encoded in parallel; tiktoken
        encodes the text between special tokens separately (so the ids are the same) and fills numpy
        buffers without holding the GIL, where a list of Python ints per text would serialise the threads.
        """
        if not texts:
            return np.empty(0, dtype=np.uint32)
        if any(EOT_TEXT in text for text in texts):  # the literal string must stay text, not become a token
            return np.concatenate([np.asarray([*self.encode_ordinary(t), self.eot_id], dtype=np.uint32) for t in texts])
        count = max(1, min(num_threads, len(texts)))
        size = math.ceil(len(texts) / count)
        pieces = [EOT_TEXT.join(texts[i : i + size]) + EOT_TEXT for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(count) as pool:
            arrays = list(pool.map(lambda p: self.encoding.encode_to_numpy(p, allowed_special={EOT_TEXT}), pieces))
        return np.concatenate(arrays).astype(np.uint32, copy=False)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; bytes that do not form valid UTF-8 become U+FFFD."""
        return self.encoding.decode(self._checked(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(self._checked([token_id])[0])

    def token_byte_lengths(self) -> torch.Tensor:
        """UTF-8 bytes each token id stands for (int64, shape [vocab_size]): the denominator of bits per
        byte. End-of-text stands for no text and counts 0."""
        return _gpt2_byte_lengths(self.encoding).clone()

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """One display string per token.

        A byte-level BPE token can hold part of a UTF-8 character (an emoji is often two or three
        tokens). Such a token cannot be shown as text on its own, so its incomplete bytes are shown
        as escapes like `\\xf0\\x9f`; whole characters are shown as themselves.
        """
        return [self.token_bytes(i).decode("utf-8", errors="backslashreplace") for i in ids]

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return ids


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back bytes of an unfinished character.

    Streaming token by token must not print a broken character when an emoji spans two tokens; the
    pieces it returns always concatenate to `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)

    def decode_all(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            yield self.push(i)
        yield self.flush()


@cache
def _gpt2_byte_lengths(encoding: tiktoken.Encoding) -> torch.Tensor:
    special = {encoding.encode_single_token(t) for t in encoding.special_tokens_set}
    lengths = [0 if i in special else len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)]
    return torch.tensor(lengths, dtype=torch.int64)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@cache
def load_tokenizer(ranks_path: str | None = None) -> Tokenizer:
    """The GPT-2 tokenizer, built from the bundled ranks file (verified by sha256)."""
    path = Path(ranks_path) if ranks_path else RANKS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 BPE ranks file not found at {path}")
    digest = _sha256(path)
    if digest != RANKS_SHA256:
        raise ValueError(
            f"GPT-2 BPE ranks file {path} has sha256 {digest}, expected {RANKS_SHA256}: "
            "the file is damaged or not the GPT-2 vocabulary"
        )
    ranks = load_tiktoken_bpe(str(path))
    encoding = tiktoken.Encoding(
        name="gpt2-slm",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_ID},
        explicit_n_vocab=EOT_ID + 1,
    )
    return Tokenizer(encoding)
