"""Bounds on sizes a user can type or send, and the one policy for prompts longer than a model's context.

Model sizes are bounded in `ModelConfig.validate` (config.py) and training sizes in
`TrainConfig.validate` (train_config.py); this module holds what the playground's requests and
uploads may ask for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

DEFAULT_MAX_UPLOAD_MB = 200.0  # training text; TinyStories' whole training split is ~1.9 GB, a sample far less
CHARS_PER_TOKEN_BOUND = 64  # GPT-2 tokens are rarely longer; text beyond this many chars per kept token is cut unread


class _Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class FittedPrompt:
    ids: list[int]
    dropped_tokens: int  # tokens cut from the front (counted over the part that was tokenized)
    dropped_chars: int  # characters cut from the front before tokenizing (0 for ordinary prompts)

    @property
    def trimmed(self) -> bool:
        return bool(self.dropped_tokens or self.dropped_chars)

    @property
    def notice(self) -> str | None:
        """A sentence for the user when the prompt was trimmed, else None."""
        if not self.trimmed:
            return None
        what = (f"its first {self.dropped_tokens:,} tokens were dropped" if not self.dropped_chars
                else f"its first {self.dropped_chars:,} characters were dropped")
        return f"The prompt is longer than the model can read at once: {what} and the last {len(self.ids):,} kept."


def fit_prompt(tokenizer: _Encoder, text: str, max_tokens: int) -> FittedPrompt:
    """The last `max_tokens` tokens of `text` (the most recent context matters most).

    A text far longer than that is cut by characters before tokenizing, so a megabyte-long prompt
    costs no more than one that fills the context.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    max_chars = max_tokens * CHARS_PER_TOKEN_BOUND
    dropped_chars = max(0, len(text) - max_chars)
    ids = list(tokenizer.encode(text[dropped_chars:]))
    dropped_tokens = max(0, len(ids) - max_tokens)
    return FittedPrompt(ids[dropped_tokens:], dropped_tokens, dropped_chars)
