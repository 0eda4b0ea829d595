"""slm: a Gemma 3-style small language model built from scratch in PyTorch.

    import slm
    model = slm.load_model("checkpoints/tiny")          # ours or a transformers Gemma 3 folder
    tok = slm.load_tokenizer()
    new = slm.generate(model, tok.encode("Once upon a time"), max_new_tokens=50, temperature=0.8, top_k=50)
    print(tok.decode(new))
"""

from .checkpoint import CheckpointError, save_checkpoint
from .config import PRESETS, ModelConfig, count_parameters, preset
from .engine import generate, stream_generate, warm_up
from .loading import list_checkpoints, load_model
from .model import Gemma3LM, build_model
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Gemma3LM",
    "ModelConfig",
    "SamplingParams",
    "Tokenizer",
    "build_model",
    "count_parameters",
    "generate",
    "list_checkpoints",
    "load_model",
    "load_tokenizer",
    "preset",
    "save_checkpoint",
    "stream_generate",
    "warm_up",
]
