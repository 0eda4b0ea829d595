"""The Gemma 3 decoder, from scratch: RMSNorm, rotary embedding, attention, GeGLU MLP, block, model.

Parameter names follow transformers' Gemma 3 state dict (`embed_tokens`, `q_proj`, `q_norm`,
`input_layernorm`, ...) so that conversion is a rename table. The semantics are those of
`transformers.models.gemma3.modeling_gemma3`, checked by the parity tests; see `../shared/GUIDE.md` §3.

Ways through the model share one set of modules and one attention signature (`attention.py`); each
entry point picks its attention backend once:
- `model(input_ids)`: the full sequence through SDPA (scoring, evaluation);
- `model.loss(...)`: the same with the training backend ("sdpa", or "flex" for fixed training shapes);
- `model(input_ids, cache=cache)` / `model.decode_step(...)`: through a preallocated `KVCache`;
- `model.trace(input_ids)`: also returns every layer's hidden state and attention probabilities.
Speed policy (compiling, CUDA graphs, static caches) lives in `engine.py`, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionFn, attention_backend, flex_attention_available, triton_available
from .config import GLOBAL, SLIDING, ModelConfig
from .kv_cache import KVCache, LayerKVCache
from .losses import TrainingVocabulary, linear_cross_entropy
from .masks import sliding_causal_mask, window_mask

VOCAB_MULTIPLE = 64  # the embedding is padded to this many rows: aligned matmuls, hidden from users
TRAINING_BACKENDS = ("auto", "sdpa", "flex")


def Linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free nn.Linear: Gemma has no biases anywhere."""
    return nn.Linear(in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in fp32, scaled by (1 + weight) so that zero-initialised weights are identity."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


def rope_inverse_frequencies(head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """fp32 inverse frequencies, computed exactly as the reference does."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, head_dim) in fp32 for the half-split rotary convention."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


class RotaryEmbedding(nn.Module):
    """The inverse frequencies of one rotary base, as a buffer built at construction.

    The buffer is not persistent (checkpoints do not change) and stays fp32 whatever the model is
    cast to: `_apply` (behind `.to()`, `.half()`, ...) moves it but rebuilds it in fp32. Being a
    buffer, a compiled step sees the same tensor on every call and never recompiles for it.
    """

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, base), persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inverse_frequencies(self.head_dim, self.base, self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.inv_freq)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys; done in fp32 and cast back."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


class Attention(nn.Module):
    """Grouped-query attention with QK-norm, rotary embedding, and an optional sliding window."""

    def __init__(self, config: ModelConfig, layer_type: str) -> None:
        super().__init__()
        d, h = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, h
        self.window: int | None = config.sliding_window if layer_type == SLIDING else None
        self.scale = config.query_pre_attn_scalar**-0.5
        self.q_proj = Linear(d, config.num_heads * h)
        self.k_proj = Linear(d, config.num_kv_heads * h)
        self.v_proj = Linear(d, config.num_kv_heads * h)
        self.o_proj = Linear(config.num_heads * h, d)
        self.q_norm = RMSNorm(h, config.rms_norm_eps)
        self.k_norm = RMSNorm(h, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        attend: AttentionFn,
        cache: LayerKVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`positions` (T,) are the tokens' positions; with a cache they continue what it holds."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v, key_positions = cache.update(k, v, positions)
            mask = window_mask(positions, key_positions, self.window)
        elif self.window is not None and self.window < T:
            mask = sliding_causal_mask(T, self.window, x.device)
        else:
            mask = None  # plain causal attention: the window cannot bind
        out, weights = attend(q, k, v, mask=mask, window=self.window, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out), weights


class MLP(nn.Module):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x)), no biases."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One block with Gemma's sandwich norms around both attention and MLP."""

    def __init__(self, config: ModelConfig, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(config, layer_type)
        self.mlp = MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, attend: AttentionFn,
        cache: LayerKVCache | None = None, dropout: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`dropout` (training only) zeroes that share of each branch's output before it joins the residual."""
        attn, weights = self.self_attn(self.input_layernorm(x), cos, sin, positions, attend, cache)
        x = x + branch_dropout(self.post_attention_layernorm(attn), dropout)
        x = x + branch_dropout(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), dropout)
        return x, weights


def branch_dropout(branch: torch.Tensor, rate: float) -> torch.Tensor:
    """Inverted dropout at `rate` rounded to 1/256, its mask read from random bytes, eight per 64-bit draw.

    A CPU draws random numbers serially: F.dropout's one draw per element took 5.5 ms of a ~150 ms
    `tiny` step per call (eight calls a step); the bytes take 0.4 ms.
    """
    if rate <= 0:
        return branch
    threshold = min(255, round(rate * 256))  # a rate that rounds to 1 still keeps 1/256
    count = branch.numel()
    # the whole 64-bit range (random_() alone leaves the top bit 0)
    words = torch.empty((count + 7) // 8, dtype=torch.int64, device=branch.device).random_(-(2**63), 2**63 - 1)
    keep = words.view(torch.uint8)[:count].view(branch.shape) >= threshold
    return branch * (keep.to(branch.dtype) * (256 / (256 - threshold)))


@dataclass
class Trace:
    """Everything inspection needs from one forward pass."""

    logits: torch.Tensor  # (B, T, vocab)
    hidden_states: list[torch.Tensor]  # the residual stream entering each layer, then the last layer's output
    attentions: list[torch.Tensor]  # per layer, fp32 probabilities (B, heads, T, T)


class Gemma3LM(nn.Module):
    """The Gemma 3 decoder-only language model with (by default) tied input and output embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.padded_vocab_size = math.ceil(config.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        self.embed_tokens = nn.Embedding(self.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None if config.tie_embeddings
            else Linear(config.hidden_size, self.padded_vocab_size)
        )
        self.rotary = nn.ModuleDict({
            SLIDING: RotaryEmbedding(config.head_dim, config.rope_local_base),
            GLOBAL: RotaryEmbedding(config.head_dim, config.rope_global_base),
        })
        # sqrt(hidden) as a buffer: cast with the weights (25.25 in bf16) and no new tensor per forward
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size**0.5), persistent=False)
        self.training_backend = "auto"
        self.reset_parameters()

    # ----- set-up -------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std) for matrices and embeddings, zeros for norm weights and padding rows."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.zeros_(module.weight)
        self.embed_tokens.weight[self.config.vocab_size :].zero_()
        if self.lm_head is not None:
            self.lm_head.weight[self.config.vocab_size :].zero_()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """A preallocated KV cache for `max_length` positions (default: the config's context length)."""
        return KVCache(
            self.config, batch_size, max_length or self.config.context_length, self.device, self.dtype
        )

    # ----- pieces -------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings scaled by sqrt(hidden), the factor cast to the weight dtype first (25.25 in bf16).
        `table`: rows of the embedding to look `input_ids` up in instead (the training loss's columns)."""
        weight = self.embed_tokens.weight
        rows = self.embed_tokens(input_ids) if table is None else F.embedding(input_ids, table)
        return rows * self.embed_scale.to(weight.dtype)

    def rotary_tables(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for the given positions, per layer type (local and global bases differ)."""
        return {layer_type: rotary(positions) for layer_type, rotary in self.rotary.items()}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project normalised hidden states onto the vocabulary (padding rows dropped)."""
        return F.linear(hidden, self.head_weight)[..., : self.config.vocab_size]

    def logits_slice(self, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The logits of vocabulary entries lo..hi-1 only (for statistics that stream over the vocabulary)."""
        if not 0 <= lo < hi <= self.config.vocab_size:
            raise ValueError(f"vocabulary slice [{lo}, {hi}) is outside [0, {self.config.vocab_size})")
        return F.linear(hidden, self.head_weight[lo:hi])

    def _run_layers(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttentionFn, cache: KVCache | None,
        return_trace: bool = False, dropout: float = 0.0, embedding_dropout: float = 0.0,
        embedded: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The blocks over `input_ids` (or their embeddings, where the caller has looked them up)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}")
        x = branch_dropout(self.embed(input_ids) if embedded is None else embedded, embedding_dropout)
        tables = self.rotary_tables(positions)
        hidden_states, attentions = [], []
        for i, layer in enumerate(self.layers):
            if return_trace:
                hidden_states.append(x)
            cos, sin = tables[layer.layer_type]
            x, weights = layer(x, cos, sin, positions, attend, cache.layers[i] if cache is not None else None, dropout)
            if return_trace:
                attentions.append(weights)
        if return_trace:
            hidden_states.append(x)
        return self.norm(x), hidden_states, attentions

    def _positions(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """0..T-1, or with a cache the positions after what it holds (and the cache advances)."""
        T = input_ids.shape[-1]
        start = 0
        if cache is not None:
            cache.check_room(T)
            start = cache.length
            cache.length += T
        return torch.arange(start, start + T, device=input_ids.device)

    # ----- entry points -------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (B, T, vocab); with a cache, the tokens continue what the cache holds.

        `last_only` returns logits for the last position only (B, 1, vocab): what a prefill needs.
        """
        positions = self._positions(input_ids, cache)
        hidden, _, _ = self._run_layers(input_ids, positions, attention_backend("sdpa"), cache)
        if last_only:
            hidden = hidden[:, -1:]
        return self.logits(hidden)

    def decode_step(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab) for one token (B, 1) at `position` (a 0-d or 1-element tensor), through the cache.

        Shapes and Python state do not depend on the position (the caller keeps it, on the device),
        so the engine compiles this once per cache and, on CUDA, captures it as a graph.
        """
        hidden, _, _ = self._run_layers(token, position.view(1), attention_backend("sdpa"), cache)
        return self.logits(hidden[:, -1])

    def set_attention_backend(self, backend: str) -> None:
        """The training loss's attention: "sdpa", "flex" (FlexAttention on sliding layers) or "auto"
        (flex on CUDA with Triton). Inference always takes SDPA: its lengths vary, and compiled flex
        would recompile for each."""
        if backend not in TRAINING_BACKENDS:
            raise ValueError(f"attention backend must be one of {TRAINING_BACKENDS}, got {backend!r}")
        self.training_backend = backend

    def _training_attention(self, device: torch.device) -> AttentionFn:
        backend = self.training_backend
        if backend == "auto":
            use_flex = device.type == "cuda" and flex_attention_available() and triton_available()
            backend = "flex" if use_flex else "sdpa"
        return attention_backend(backend)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             vocabulary: TrainingVocabulary | None = None, dropout: float = 0.0,
             embedding_dropout: float = 0.0) -> torch.Tensor:
        """Mean next-token cross-entropy, computed in chunks so the full fp32 logits never exist.

        With the training text's `vocabulary` (whose unused rows this model shares), the same loss at
        the cost of the ids the text uses. `dropout` regularises the blocks' branches and
        `embedding_dropout` the embedded input (training only: nothing else in the model drops anything).
        """
        positions = self._positions(input_ids, None)
        columns = embedded = None
        if vocabulary is not None:
            columns = vocabulary.gather(self.head_weight)
            if self.lm_head is None:  # tied: the inputs too are looked up in the columns, whose one
                # gradient then reaches the vocabulary-sized weight once per step rather than twice
                embedded = self.embed(vocabulary.input_columns(input_ids), columns)
        hidden, _, _ = self._run_layers(
            input_ids, positions, self._training_attention(input_ids.device), None, dropout=dropout,
            embedding_dropout=embedding_dropout, embedded=embedded,
        )
        if vocabulary is not None:
            return vocabulary.loss(hidden.flatten(0, 1), columns, targets.flatten(), ignore_index)
        return linear_cross_entropy(
            hidden.flatten(0, 1), self.head_weight, targets.flatten(), self.config.vocab_size, ignore_index
        )

    def unlikelihood_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, unlikely: torch.Tensor,
                          start: int = 0) -> torch.Tensor:
        """Mean of -log(1 - p(target)) over the positions `unlikely` (bool, like `targets`) marks: the
        sequence-level unlikelihood term (slm/unlikelihood.py); 0 when nothing is marked. Positions
        before `start` are never marked, so their logits are not formed. Full-vocabulary softmax, fp32."""
        positions = self._positions(input_ids, None)
        hidden, _, _ = self._run_layers(input_ids, positions, self._training_attention(input_ids.device), None)
        log_p = self.logits(hidden[:, start:]).float().log_softmax(-1)
        p = log_p.gather(-1, targets[:, start:, None]).squeeze(-1).exp()
        marked = unlikely[:, start:].to(p.dtype)
        return (-torch.log1p(-p.clamp(max=1 - 1e-5)) * marked).sum() / marked.sum().clamp(min=1)

    @torch.no_grad()
    def trace(self, input_ids: torch.Tensor) -> Trace:
        """A full forward pass that keeps every layer's hidden state and attention probabilities."""
        positions = self._positions(input_ids, None)
        hidden, hidden_states, attentions = self._run_layers(
            input_ids, positions, attention_backend("eager"), None, return_trace=True
        )
        return Trace(logits=self.logits(hidden), hidden_states=hidden_states, attentions=attentions)

    # ----- weights without the vocabulary padding -----------------------------------------------
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with the padding rows removed: what checkpoints and conversion store."""
        vocab = self.config.vocab_size
        state = {}
        for name, tensor in self.state_dict().items():
            if name in ("embed_tokens.weight", "lm_head.weight"):
                tensor = tensor[:vocab]
            state[name] = tensor.detach()
        return state

    @torch.no_grad()
    def load_export_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by `export_state_dict` (strict: every name and shape must match)."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        vocab = self.config.vocab_size
        for name, target in own.items():
            source = state[name]
            view = target[:vocab] if name in ("embed_tokens.weight", "lm_head.weight") else target
            if tuple(source.shape) != tuple(view.shape):
                raise ValueError(
                    f"{name}: checkpoint has shape {tuple(source.shape)}, model expects {tuple(view.shape)}"
                )
            view.copy_(source)


def build_model(config: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                seed: int | None = None) -> Gemma3LM:
    """A freshly initialised model (reproducible when `seed` is given)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Gemma3LM(config)
    else:
        model = Gemma3LM(config)
    return model.to(device=device, dtype=dtype)
