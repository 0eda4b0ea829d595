"""Small Gemma 3 folders for tests: a transformers Gemma3ForCausalLM and a tokenizer.json made here.

The tokenizer is trained by the test on text it makes, with what matters about Gemma's: a
SentencePiece-style BPE with byte fallback (`<0xE2>` tokens), `▁` for spaces, Gemma's special ids
(pad 0, eos 1, bos 2, <start_of_turn> 105, <end_of_turn> 106), BOS added by a post-processor, and
Gemma's chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *[f"<unused{i}>" for i in range(5, 105)],
                  "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID, START_OF_TURN_ID, END_OF_TURN_ID = 0, 1, 2, 105, 106
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def training_text() -> list[str]:
    names = ["Lily", "Tom", "Max", "Sue", "Ben", "Mia"]
    things = ["ball", "cat", "tree", "boat", "cake", "kite"]
    return [
        f"Once upon a time, there was a little girl named {n}. She had a red {t}. {n} was happy and played all day."
        for n in names for t in things
    ]


def make_gemma_tokenizer_json(merges_budget: int = 200, vocab_size: int | None = None):
    """A `tokenizers.Tokenizer` laid out like Gemma 3's (ids 0-106 special, then bytes, then merges).

    With `vocab_size` the vocabulary is filled up to that size with word pieces that no merge
    produces (Gemma 3's has 262,144 entries), so every id a large-vocabulary model emits decodes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

    scratch = Tokenizer(models.BPE(unk_token="<unk>"))
    scratch.normalizer = normalizers.Replace(" ", "▁")
    scratch.train_from_iterator(training_text(), trainers.BpeTrainer(vocab_size=merges_budget, show_progress=False))
    trained = json.loads(scratch.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *BYTE_TOKENS]:
        vocab[token] = len(vocab)
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    for index in range(len(vocab), vocab_size or 0):
        vocab[f"▁word{index}"] = index
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_gemma_tokenizer(folder: Path, chat: bool = True, vocab_size: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_gemma_tokenizer_json(vocab_size=vocab_size).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 1_000_000,
    }
    if chat:
        config["chat_template"] = GEMMA_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def gemma_text_config(vocab_size: int, **overrides):
    import transformers

    values = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=128,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=16,
        pad_token_id=None, bos_token_id=BOS_ID, eos_token_id=EOS_ID, initializer_range=0.3,
    )
    values.update(overrides)
    return transformers.Gemma3TextConfig(**values)


def make_gemma_folder(folder: Path, with_tokenizer: bool = True, seed: int = 0, **overrides) -> Path:
    """A transformers-written Gemma3ForCausalLM folder (random weights, norms too) with our tokenizer."""
    import transformers

    tokenizer_vocab = overrides.pop("tokenizer_vocab", None)
    vocab_size = overrides.pop("vocab_size", None)
    vocab_size = vocab_size or make_gemma_tokenizer_json(vocab_size=tokenizer_vocab).get_vocab_size()
    torch.manual_seed(seed)
    config = gemma_text_config(vocab_size, **overrides)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    if with_tokenizer:
        write_gemma_tokenizer(folder, vocab_size=tokenizer_vocab)
    return folder
