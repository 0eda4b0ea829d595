"""Tokenizers, one interface for two kinds: GPT-2's byte-level BPE (bundled, through tiktoken) and a
checkpoint's own `tokenizer.json` (through the `tokenizers` library, the format's own reader).

`tiktoken.get_encoding("gpt2")` downloads its files; we build the same encoding from a bundled copy
whose sha256 is checked on load, so the tokenizer works without a network and cannot silently change.
A checkpoint folder that carries a `tokenizer.json` (Gemma 3's 262,144-token vocabulary, say) brings
its own tokenizer; `load_tokenizer(folder)` returns it, or GPT-2 when the folder has none.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

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
    """Text <-> token ids, plus the per-token views the playground shows (the shared interface).

    `eot_id` is the model's end-of-sequence id, `bos_id` the id `encode` puts first (None for GPT-2),
    `stop_ids` every id that ends a generation, `identity` a digest that changes with the vocabulary.
    """

    name: str = "tokenizer"
    eot_id: int
    vocab_size: int
    bos_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None
    identity: str = ""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        raise NotImplementedError

    def encode_documents(self, texts: Sequence[str], num_threads: int = 8) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def encode_chat(self, prompt: str) -> list[int]:
        """The prompt as a user turn of the chat template (instruction-tuned vocabularies only)."""
        raise ValueError(f"the {self.name} tokenizer has no chat template")

    @property
    def is_gpt2(self) -> bool:
        return False

    @property
    def stop_ids(self) -> list[int]:
        """End of sequence, and the end-of-turn token of chat-tuned vocabularies (`<end_of_turn>`)."""
        return [self.eot_id]

    @property
    def max_ordinary_id(self) -> int:
        """The largest id that ordinary text can encode to: the model's vocabulary must hold it."""
        return self.vocab_size - 1

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """One display string per token.

        A byte-level BPE token (or a byte-fallback token such as `<0xE2>`) can hold part of a UTF-8
        character (an emoji is often two or three tokens). Such a token cannot be shown as text on its
        own, so its incomplete bytes are shown as escapes like `\\xf0\\x9f`; whole characters are shown
        as themselves.
        """
        return [self.token_bytes(i).decode("utf-8", errors="backslashreplace") for i in ids]

    def token_byte_lengths(self) -> torch.Tensor:
        """UTF-8 bytes of text per token id, (vocab_size,) int64: what bits per byte divides by.

        Special tokens (end-of-text, BOS, ...) count 0 bytes: they are not text.
        """
        return torch.tensor([len(self.token_bytes(i)) for i in range(self.vocab_size)], dtype=torch.long)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint records about the tokenizer it was trained with."""
        return {"name": self.name, "sha256": self.identity, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    def save(self, folder: Path) -> None:
        """Copy the files this tokenizer is read from into `folder` (nothing for the bundled GPT-2)."""

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return ids


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE through tiktoken."""

    name = "gpt2"
    identity = RANKS_SHA256

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

    @property
    def is_gpt2(self) -> bool:
        return True

    def token_byte_lengths(self) -> torch.Tensor:
        return _gpt2_byte_lengths(self.encoding).clone()


@cache
def _gpt2_byte_lengths(encoding: tiktoken.Encoding) -> torch.Tensor:
    """Built once per process (50k lookups); end-of-text is a marker, not text, and counts 0."""
    special = {encoding.encode_single_token(t) for t in encoding.special_tokens_set}
    lengths = [0 if i in special else len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)]
    return torch.tensor(lengths, dtype=torch.long)


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


class FileStreamDecoder:
    """`StreamDecoder` for a `tokenizer.json`: the `tokenizers` library's own incremental decoder, which
    holds back byte-fallback pieces (`<0xF0>` ...) until their character is complete. BOS, EOS and
    padding are left out, as `decode` leaves them out."""

    def __init__(self, tokenizer: FileTokenizer) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        token_id = self._tokenizer._checked([token_id])[0]
        if token_id in self._tokenizer.hidden_ids:
            return ""
        return self._stream.step(self._tokenizer.backend, token_id) or ""

    def flush(self) -> str:
        return ""  # DecodeStream never holds back a complete character; an incomplete one is dropped

    def decode_all(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            yield self.push(i)
        yield self.flush()


TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# what a checkpoint folder holds of its tokenizer (copied with the model by training and conversion)
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "chat_template.jinja")
# tokens that end a turn in chat-tuned vocabularies: generation stops there as well as at EOS
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")
BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class FileTokenizer(Tokenizer):
    """A checkpoint's own tokenizer: `tokenizer.json` read by the `tokenizers` library, with BOS, EOS,
    padding and the chat template from `tokenizer_config.json` (or `special_tokens_map.json`).

    `encode` gives the ids `transformers.AutoTokenizer` gives (BOS first where its post-processor
    adds one); `decode` leaves BOS, EOS and padding out.
    """

    name = "tokenizer.json"

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer as Backend

        self.folder = Path(folder)
        path = self.folder / TOKENIZER_FILE
        try:
            self.backend = Backend.from_file(str(path))
        except Exception as exc:  # the library raises plain Exceptions for malformed files
            raise ValueError(f"{path} is not a readable tokenizer.json: {exc}") from exc
        self.identity = _sha256(path)
        config = self._read_config()
        self._added = self.backend.get_added_tokens_decoder()
        self.vocab_size = max(self.backend.get_vocab_size(with_added_tokens=True), max(self._added, default=-1) + 1)
        self.special_ids = {i for i, token in self._added.items() if token.special}
        self.bos_id = self._special_id(config, "bos_token")
        eot = self._special_id(config, "eos_token")
        if eot is None:
            raise ValueError(f"{self.folder} names no eos_token (in {TOKENIZER_CONFIG_FILE}) that its vocabulary "
                             "holds, so generation could never stop")
        self.eot_id = eot
        self.pad_id = self._special_id(config, "pad_token")
        self.hidden_ids = {i for i in (self.bos_id, self.eot_id, self.pad_id) if i is not None}
        self.chat_template = self._read_chat_template(config)
        self._byte_level = "ByteLevel" in str(self.backend.decoder)  # GPT-2-style pieces ("Ġthe")

    # ----- reading the folder ---------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", TOKENIZER_CONFIG_FILE):  # the second wins
            path = self.folder / name
            if path.is_file():
                try:
                    data = json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{path} is not valid JSON: {exc}") from exc
                if isinstance(data, dict):
                    config.update(data)
        return config

    def _special_id(self, config: dict[str, Any], key: str) -> int | None:
        text = _token_text(config.get(key))
        return None if text is None else self.backend.token_to_id(text)

    def _read_chat_template(self, config: dict[str, Any]) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    # ----- the interface --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids as transformers' AutoTokenizer gives them: special tokens written in the text are
        matched, and the post-processor's BOS comes first."""
        return self.backend.encode(text).ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Encode many texts in parallel (the library's own threads), without BOS."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str], num_threads: int = 8) -> np.ndarray:
        """Training stream: every text as `encode` gives it (BOS first where this vocabulary uses one,
        as the model was trained), followed by EOS; as one uint32 array."""
        if not texts:
            return np.empty(0, dtype=np.uint32)
        encoded = self.backend.encode_batch(list(texts), add_special_tokens=True)
        return np.concatenate([np.asarray([*e.ids, self.eot_id], dtype=np.uint32) for e in encoded])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; BOS, EOS and padding are left out, other special tokens are shown."""
        kept = [i for i in self._checked(ids) if i not in self.hidden_ids]
        return self.backend.decode(kept, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token: a byte-fallback piece `<0xE2>` is that one byte, `▁` is a space."""
        token_id = self._checked([token_id])[0]
        added = self._added.get(token_id)
        if added is not None:
            return added.content.encode()
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        byte = BYTE_FALLBACK.match(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        if self._byte_level:
            return bytes(_UNICODE_TO_BYTE.get(c, 0) for c in piece)
        return piece.replace("▁", " ").encode()

    def token_byte_lengths(self) -> torch.Tensor:
        lengths = [0] * self.vocab_size
        for i in range(self.vocab_size):
            piece = self.backend.id_to_token(i)
            if piece is None:
                continue
            if piece.startswith("<0x") and BYTE_FALLBACK.match(piece):
                lengths[i] = 1
            elif self._byte_level:
                lengths[i] = len(piece)
            else:
                lengths[i] = len(piece.replace("▁", " ").encode())
        for i, token in self._added.items():
            lengths[i] = 0 if token.special else len(token.content.encode())
        return torch.tensor(lengths, dtype=torch.long)

    def stream_decoder(self) -> FileStreamDecoder:  # type: ignore[override]
        return FileStreamDecoder(self)

    @property
    def stop_ids(self) -> list[int]:
        ends = (self.backend.token_to_id(t) for t in END_OF_TURN_TOKENS)
        return sorted({self.eot_id, *(i for i in ends if i is not None)})

    @property
    def max_ordinary_id(self) -> int:
        last = self.vocab_size - 1
        while last > 0 and last in self.special_ids:
            last -= 1
        return last

    # ----- chat -----------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template filled in (Jinja, sandboxed, with transformers' settings)."""
        if not self.chat_template:
            raise ValueError(f"{self.folder} has no chat template (a base model, not an instruction-tuned one)")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"the chat template refused the conversation: {message}")

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        specials = {}
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eot_id), ("pad_token", self.pad_id)):
            specials[key] = self.backend.id_to_token(token_id) if token_id is not None else ""
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **specials
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template of {self.folder} failed: {exc}") from exc

    def encode_chat(self, prompt: str) -> list[int]:
        """The prompt as one user turn, followed by the start of the model's turn (as
        `apply_chat_template(..., add_generation_prompt=True)` tokenizes it)."""
        text = self.render_chat([{"role": "user", "content": prompt}])
        return self.encode_ordinary(text)  # the template writes BOS itself

    # ----- checkpoints ----------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        for name in TOKENIZER_FILES:
            source = self.folder / name
            if source.is_file() and source.resolve() != (Path(folder) / name).resolve():
                shutil.copyfile(source, Path(folder) / name)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocabularies use it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def has_tokenizer_files(folder: str | Path) -> bool:
    return (Path(folder) / TOKENIZER_FILE).is_file()


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint folder (its `tokenizer.json`), or GPT-2 when `path` is None or the
    folder has no tokenizer files."""
    if path is not None:
        folder = Path(path).expanduser()
        folder = folder.parent if folder.is_file() else folder
        if has_tokenizer_files(folder):
            return FileTokenizer(folder)
    return gpt2_tokenizer()


@cache
def gpt2_tokenizer(ranks_path: str | None = None) -> GPT2Tokenizer:
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
    return GPT2Tokenizer(encoding)
