"""Conversion to and from the transformers Gemma 3 text layout (`Gemma3ForCausalLM`).

Our parameter names are transformers' names without the `model.` prefix, so the weights need no
arithmetic, only a rename. The config is written in both the 4.x spelling (`rope_theta`,
`rope_local_base_freq`) and the 5.x one (`rope_parameters`) so either version loads it. The tokenizer
travels both ways: a checkpoint's own `tokenizer.json` (Gemma's, say) is copied as it is, and the
bundled GPT-2 tokenizer is written as `vocab.json` + `merges.txt` so `AutoTokenizer` loads it too.

    python -m slm.hf to-hf CHECKPOINT OUT     # our folder -> transformers folder
    python -m slm.hf from-hf HF_DIR OUT       # transformers folder -> our folder

transformers itself is never imported: the formats are plain JSON and safetensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import (
    CheckpointError,
    atomic_directory,
    load_checkpoint,
    read_json,
    read_safetensors,
    refuse_pickle,
    save_checkpoint,
    write_json,
)
from .config import GLOBAL, LAYER_TYPES, SLIDING, ModelConfig, layer_types_from_pattern
from .model import Gemma3LM
from .tokenizer import EOT_ID, EOT_TEXT, Tokenizer, _bytes_to_unicode, gpt2_tokenizer, load_tokenizer

HF_PREFIX = "model."
TEXT_MODEL_TYPES = ("gemma3_text",)


def is_hf_config(data: dict[str, Any]) -> bool:
    return "model_type" in data or "architectures" in data


def config_to_hf(config: ModelConfig, torch_dtype: str = "float32", tokenizer: Tokenizer | None = None
                 ) -> dict[str, Any]:
    eot = EOT_ID if config.vocab_size > EOT_ID else None  # small test vocabularies have no GPT-2 end-of-text
    bos = eot
    if tokenizer is not None and not tokenizer.is_gpt2:
        eot, bos = tokenizer.eot_id, tokenizer.bos_id
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": config.rms_norm_eps,
        "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types),
        "sliding_window_pattern": config.sliding_window_pattern,
        "rope_theta": config.rope_global_base,
        "rope_local_base_freq": config.rope_local_base,
        "rope_parameters": {
            GLOBAL: {"rope_type": "default", "rope_theta": config.rope_global_base},
            SLIDING: {"rope_type": "default", "rope_theta": config.rope_local_base},
        },
        "rope_scaling": None,
        "query_pre_attn_scalar": _int_if_whole(config.query_pre_attn_scalar),
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "bos_token_id": bos,
        "eos_token_id": eot,
        "pad_token_id": None,  # transformers' default 0 would zero embedding row 0 at init
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "use_cache": True,
    }


def _int_if_whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value  # transformers types this field as int


def _rope_bases(data: dict[str, Any]) -> tuple[float, float]:
    params = data.get("rope_parameters") or {}
    if SLIDING in params and GLOBAL in params:
        for kind in (SLIDING, GLOBAL):
            if params[kind].get("rope_type", "default") != "default":
                raise CheckpointError(f"rope scaling {params[kind]['rope_type']!r} is not supported")
        return float(params[SLIDING]["rope_theta"]), float(params[GLOBAL]["rope_theta"])
    if data.get("rope_scaling"):
        raise CheckpointError(f"rope scaling {data['rope_scaling']!r} is not supported")
    return float(data.get("rope_local_base_freq", 10_000.0)), float(data.get("rope_theta", 1_000_000.0))


def config_from_hf(data: dict[str, Any]) -> ModelConfig:
    """Our config from a transformers Gemma 3 text config (refusing features our model lacks)."""
    if "text_config" in data:
        raise CheckpointError("this is a multimodal Gemma 3 checkpoint; only Gemma3ForCausalLM text models load")
    if data.get("model_type") not in TEXT_MODEL_TYPES:
        raise CheckpointError(f"model_type {data.get('model_type')!r} is not a Gemma 3 text model (gemma3_text)")
    for feature in ("attn_logit_softcapping", "final_logit_softcapping"):
        if data.get(feature) is not None:
            raise CheckpointError(f"{feature}={data[feature]} is not supported by this model")
    if data.get("use_bidirectional_attention") or data.get("attention_bias"):
        raise CheckpointError("bidirectional attention and attention biases are not supported")
    if data.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(f"activation {data['hidden_activation']!r} is not supported")
    local, global_ = _rope_bases(data)
    num_layers = int(data["num_hidden_layers"])
    layer_types = data.get("layer_types")
    pattern = int(data.get("sliding_window_pattern", data.get("_sliding_window_pattern", 6)))
    if layer_types is not None:
        if not set(layer_types) <= set(LAYER_TYPES):
            raise CheckpointError(f"unsupported layer types {sorted(set(layer_types) - set(LAYER_TYPES))}")
        # transformers 5 drops the pattern when it saves; recover it from the explicit layer types
        pattern = next((p for p in range(1, num_layers + 1)
                        if layer_types_from_pattern(num_layers, p) == list(layer_types)), pattern)
    heads = int(data["num_attention_heads"])
    try:
        return ModelConfig(
            vocab_size=int(data["vocab_size"]),
            context_length=int(data.get("max_position_embeddings", 1024)),
            hidden_size=int(data["hidden_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(data.get("num_key_value_heads", heads)),
            head_dim=int(data.get("head_dim") or data["hidden_size"] // heads),
            intermediate_size=int(data["intermediate_size"]),
            sliding_window=int(data.get("sliding_window") or 4096),
            sliding_window_pattern=pattern,
            layer_types=list(layer_types) if layer_types else [],
            rope_local_base=local,
            rope_global_base=global_,
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            query_pre_attn_scalar=float(data.get("query_pre_attn_scalar", 256)),
            tie_embeddings=bool(data.get("tie_word_embeddings", True)),
            init_std=float(data.get("initializer_range", 0.02)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"not a usable Gemma 3 text config: {exc}") from exc


def state_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        out[name if name.startswith("lm_head.") else HF_PREFIX + name] = tensor
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def state_from_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.startswith(HF_PREFIX):
            out[name[len(HF_PREFIX) :]] = tensor
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                out[name] = tensor
        else:
            raise CheckpointError(f"unexpected tensor {name!r} in a Gemma3ForCausalLM checkpoint")
    return out


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Weights from `model.safetensors` or a sharded set listed in `model.safetensors.index.json`."""
    refuse_pickle(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    return read_safetensors(single)


def load_hf_model(folder: str | Path, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> Gemma3LM:
    """Load a transformers Gemma 3 text checkpoint folder into our model, in eval mode."""
    folder = Path(folder)
    config = config_from_hf(read_json(folder / "config.json"))
    state = state_from_hf(read_hf_weights(folder), config)
    model = Gemma3LM(config)
    try:
        model.load_export_state_dict(state)
    except ValueError as exc:
        raise CheckpointError(f"{folder} weights do not match its config.json: {exc}") from exc
    return model.to(device=device, dtype=dtype).eval()


@lru_cache(maxsize=1)
def _gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """GPT-2's `vocab.json` and `merges.txt`, rebuilt from the tiktoken ranks we ship.

    Each multi-byte token is the merge of the two parts that byte-level BPE, limited to lower
    ranks, splits it into; that recovers the original merge list in rank order.
    """
    ranks = gpt2_tokenizer().encoding._mergeable_ranks
    byte_to_char = _bytes_to_unicode()

    def split(token: bytes, max_rank: int) -> tuple[bytes, bytes]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                    best = (rank, i)
            if best is None:
                break
            i = best[1]
            parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
        return parts[0], parts[1]

    def text(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = EOT_ID
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = split(token, rank)
            merges.append(f"{text(left)} {text(right)}")
    return vocab, merges


def write_hf_tokenizer(folder: Path) -> None:
    vocab, merges = _gpt2_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1_000_000,
        "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "add_prefix_space": False,
    })
    write_json(folder / "special_tokens_map.json",
               {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT})


def save_hf(model: Gemma3LM, out: str | Path, with_tokenizer: bool = True, tokenizer: Tokenizer | None = None
            ) -> Path:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads as Gemma3ForCausalLM,
    with the model's tokenizer (`tokenizer`, or GPT-2's when the vocabulary is GPT-2's)."""
    out = Path(out)
    config = model.config
    own = tokenizer is not None and not tokenizer.is_gpt2
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.export_state_dict().items()}
    dtype_name = str(model.dtype).removeprefix("torch.")
    with atomic_directory(out) as tmp:
        write_json(tmp / "config.json", config_to_hf(config, dtype_name, tokenizer))
        if own:
            write_json(tmp / "generation_config.json", {
                "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.stop_ids, "pad_token_id": tokenizer.pad_id,
            })
        elif config.vocab_size > EOT_ID:
            write_json(tmp / "generation_config.json",
                       {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID})
        save_file(state_to_hf(state, config), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if with_tokenizer and own:
            tokenizer.save(tmp)
        elif with_tokenizer and config.vocab_size == EOT_ID + 1:
            write_hf_tokenizer(tmp)
    return out


def to_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Our checkpoint folder -> a transformers folder, its tokenizer included."""
    return save_hf(load_checkpoint(checkpoint), out, tokenizer=load_tokenizer(checkpoint))


def from_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """A transformers folder -> our checkpoint folder; its tokenizer files come along and are recorded."""
    tokenizer = load_tokenizer(hf_dir)
    model = load_hf_model(hf_dir)
    fits = not tokenizer.is_gpt2 or tokenizer.vocab_size == model.config.vocab_size
    return save_checkpoint(out, model, metadata={"source": str(hf_dir)}, tokenizer=tokenizer if fits else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slm.hf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-hf", help="convert our checkpoint folder to a transformers Gemma 3 folder")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p = sub.add_parser("from-hf", help="convert a transformers Gemma 3 text folder to our checkpoint folder")
    p.add_argument("hf_dir")
    p.add_argument("out")
    args = parser.parse_args(argv)
    try:
        out = to_hf(args.checkpoint, args.out) if args.command == "to-hf" else from_hf(args.hf_dir, args.out)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
