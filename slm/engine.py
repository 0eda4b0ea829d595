"""Inference: static caches per model and size bucket, the compiled decode step, its warm-up and fallback.

In the spirit of gpt-fast: a prefill of the prompt (eager: prompt lengths vary), then one decode
step per token with every shape fixed, so the step compiles once per (model, batch, cache bucket)
and, on CUDA, is captured as a graph. What a long-running app needs on top:

- Caches are allocated once per (model, batch, bucket) and reused: the compiled step meets the same
  tensors every call (on torch 2.9 `mark_static_address` guards on identity, so a new cache per
  request would mean a new compile per request).
- Each cache gets its own compiled function with its own code object, so dynamo's per-function
  recompile limit is never shared between caches; the engine bounds the number it compiles itself.
- Any failure to compile or run compiled (no compiler, recompile limit, unsupported device) falls
  back to the same step run eagerly: one logged warning per model, the same answer.
- CUDA graphs (`mode="reduce-overhead"`) are used only from one dedicated decode thread fed by a
  queue: graph trees assert when replayed from another thread, and web servers resume generators
  on whatever worker is free. On CPU there are no graphs and callers run the step themselves.
- No host sync per token: the position lives on the device and is advanced by a device op, and
  sampling draws with an exponential race from a device generator.
- On CPU, batch 1, the compiled step runs on a twin of the model whose linear layers are written as
  multiply-and-sum: inductor turns that into one streaming reduction that reads each weight at close
  to memory bandwidth (about 3x the BLAS matrix-vector call). The twin shares the model's weights.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import logging
import os
import queue
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import triton_available
from .kv_cache import KVCache
from .model import Gemma3LM
from .sampling import NAN_TOKEN, SamplingParams, as_params, sample

log = logging.getLogger(__name__)

MIN_BUCKET = 64  # cache lengths are powers of two from here: few distinct shapes to compile
COMPILE_MIN_PARAMETERS = 20_000_000  # on CPU, smaller models decode eagerly unless asked (see `wants_compiled`)
MAX_COMPILED_STEPS = 48  # per engine; past this, new caches decode eagerly (one warning)
MAX_COMPILED_PER_BUCKET = 4  # concurrent requests beyond this share eager caches instead of compiling more
STOP_CHECK_EVERY = 16  # `generate` looks at its tokens (a host sync) once per this many steps
ENV_SWITCH = "SLM_COMPILED_DECODE"  # "1" / "0" force the default either way


def bucket_length(needed: int) -> int:
    """The cache length for `needed` positions: the next power of two, at least MIN_BUCKET."""
    length = MIN_BUCKET
    while length < needed:
        length *= 2
    return length


# ----- the decode-specific projection (CPU, one row) ---------------------------------------------
def _row_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.shape[:-1].numel() == 1:
        return (x.unsqueeze(-2) * weight).sum(-1)
    return F.linear(x, weight)


class _RowLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _row_projection(x, self.weight)


class _RowDecodeModel(Gemma3LM):
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _row_projection(hidden, self.head_weight)[..., : self.config.vocab_size]


def decode_twin(model: Gemma3LM) -> Gemma3LM:
    """A copy of the module tree sharing every parameter and buffer, whose projections are
    multiply-and-sum: only for tracing by torch.compile (eager, it would build a huge temporary)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo)
    for module in twin.modules():
        if type(module) is nn.Linear:
            module.__class__ = _RowLinear
    twin.__class__ = _RowDecodeModel
    return twin


# ----- per-model state ---------------------------------------------------------------------------
def _decode(model: Gemma3LM, cache: KVCache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    return model.decode_step(token, position, cache)


def _fresh_decode_function(number: int) -> Callable:
    """`_decode` with a code object of its own: dynamo keeps its compiled code and recompile count per
    code object, so each cache's step is compiled and counted on its own."""
    code = _decode.__code__.replace(co_name=f"decode_step_{number}")
    return types.FunctionType(code, _decode.__globals__, code.co_name)


@dataclass
class _Slot:
    """One static cache and, when compiled, the step compiled for it."""

    cache: KVCache
    step: Callable | None = None  # None: decode eagerly
    compiled_once: threading.Event = field(default_factory=threading.Event)  # set after the first compiled call
    busy: bool = False


@dataclass
class _ModelState:
    device: torch.device
    dtype: torch.dtype
    slots: dict[tuple[int, int], list[_Slot]] = field(default_factory=dict)  # (batch, bucket) -> slots
    twin: Gemma3LM | None = None
    broken: bool = False  # compiling failed once: decode eagerly from now on
    warned: bool = False


class _DecodeThread:
    """One thread that runs every compiled step on CUDA, so CUDA graphs are built and replayed there."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="slm-decode", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            fn, args, future = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with torch.no_grad():
                    future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, which falls back
                future.set_exception(exc)

    def run(self, fn: Callable, *args) -> torch.Tensor:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, args, future))
        return future.result()


class Engine:
    """Static caches and compiled decode steps for every model it has served; safe across threads."""

    def __init__(
        self, decode_thread: bool | None = None, max_compiled: int = MAX_COMPILED_STEPS, backend: str = "inductor"
    ) -> None:
        """`decode_thread` forces the dedicated decode thread on or off (default: where CUDA graphs are
        used); `backend` is torch.compile's ("eager" traces and guards without generating code: dry runs)."""
        self._states: weakref.WeakKeyDictionary[Gemma3LM, _ModelState] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._decode_thread_choice = decode_thread
        self._decode_thread: _DecodeThread | None = None
        self.max_compiled = max_compiled
        self.backend = backend
        self.compiled_count = 0
        self._limit_warned = False

    # -- policy --
    def wants_compiled(self, model: Gemma3LM) -> bool:
        """The default: compiled where it measures faster. On CUDA with Triton always; on CPU for models
        of 20M parameters or more (gemma3-270m dimensions decode about 2.5x faster than eager, see
        bench/RESULTS.md), while for smaller ones a compile (tens of seconds on a CPU) costs more than a
        story saves. `SLM_COMPILED_DECODE=1` / `0` overrides."""
        switch = os.environ.get(ENV_SWITCH)
        if switch in ("0", "1"):
            return switch == "1"
        if model.device.type == "cuda":
            return triton_available()
        if model.device.type == "cpu":
            return sum(p.numel() for p in model.parameters()) >= COMPILE_MIN_PARAMETERS
        return False

    def _uses_cuda_graphs(self, model: Gemma3LM) -> bool:
        return model.device.type == "cuda"

    def _runs_on_decode_thread(self, model: Gemma3LM) -> bool:
        if self._decode_thread_choice is not None:
            return self._decode_thread_choice
        return self._uses_cuda_graphs(model)

    # -- state --
    def _state(self, model: Gemma3LM) -> _ModelState:
        state = self._states.get(model)
        if state is None or state.device != model.device or state.dtype != model.dtype:
            state = _ModelState(model.device, model.dtype)  # a model moved or cast: caches start over
            self._states[model] = state
        return state

    def _new_compiled_step(self, model: Gemma3LM, state: _ModelState, cache: KVCache) -> Callable | None:
        if self.compiled_count >= self.max_compiled:
            if not self._limit_warned:
                self._limit_warned = True
                log.warning("%d compiled decode steps exist: further caches decode eagerly", self.max_compiled)
            return None
        self.compiled_count += 1
        twin = None
        if model.device.type == "cpu" and cache.batch_size == 1:
            if state.twin is None:
                state.twin = decode_twin(model)
            twin = state.twin
        mode = "reduce-overhead" if self._uses_cuda_graphs(model) and self.backend == "inductor" else None
        for layer in cache.layers:
            for tensor in (layer.k, layer.v, layer.positions):
                if mode is not None:
                    torch._dynamo.mark_static_address(tensor)
                # the cache length is a symbol: every bucket shares one generated kernel (compiled once,
                # then found in inductor's cache), while each cache still gets its own traced graph
                torch._dynamo.mark_dynamic(tensor, tensor.dim() - 2 if tensor.dim() > 1 else 0)
        compiled = torch.compile(_fresh_decode_function(self.compiled_count), backend=self.backend, mode=mode,
                                 fullgraph=True, dynamic=False)
        # the model itself is passed at each call, never captured: the engine must not keep alive a
        # model the app has dropped (the twin shares its weights but is not the model)
        if twin is not None:
            return lambda model_, cache_, token, position: compiled(twin, cache_, token, position)
        return compiled

    @contextlib.contextmanager
    def lease(self, model: Gemma3LM, batch_size: int, needed: int, compiled: bool | None = None) -> Iterator[_Slot]:
        """A static cache for `needed` positions, held exclusively until the block ends.

        A free compiled cache of the bucket is preferred; while one is still compiling elsewhere (a
        warm-up), the request takes an eager cache rather than wait.
        """
        want = self.wants_compiled(model) if compiled is None else compiled
        key = (batch_size, bucket_length(needed))
        with self._lock:
            state = self._state(model)
            slots = state.slots.setdefault(key, [])
            want = want and not state.broken
            free = [s for s in slots if not s.busy]
            ready = [s for s in free if (s.step is not None) == want and (not want or s.compiled_once.is_set())]
            compiling = any(s.step is not None and not s.compiled_once.is_set() for s in slots)
            n_compiled = sum(s.step is not None for s in slots)
            if ready:
                slot = ready[0]
            elif want and not compiling and n_compiled < MAX_COMPILED_PER_BUCKET:
                cache = model.new_cache(batch_size, key[1])
                slot = _Slot(cache, self._new_compiled_step(model, state, cache))
                slots.append(slot)
            else:
                eager = [s for s in free if s.step is None]
                slot = eager[0] if eager else _Slot(model.new_cache(batch_size, key[1]))
                if not eager:
                    slots.append(slot)
            slot.busy = True
        try:
            slot.cache.reset()
            yield slot
        finally:
            slot.busy = False

    # -- one step --
    def step(self, model: Gemma3LM, slot: _Slot, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for `token` (B, 1) at `position` (a device tensor) through the slot's cache."""
        if slot.step is not None:
            try:
                if self._runs_on_decode_thread(model):
                    if self._decode_thread is None:
                        with self._lock:
                            self._decode_thread = self._decode_thread or _DecodeThread()
                    logits = self._decode_thread.run(slot.step, model, slot.cache, token, position)
                else:
                    logits = slot.step(model, slot.cache, token, position)
                slot.compiled_once.set()
                return logits.clone() if self._uses_cuda_graphs(model) else logits
            except Exception as exc:  # compile error, recompile limit, no compiler for this device, ...
                self._fall_back(model, slot, exc)
        return model.decode_step(token, position, slot.cache)

    def _fall_back(self, model: Gemma3LM, slot: _Slot, exc: Exception) -> None:
        with self._lock:
            state = self._state(model)
            state.broken = True
            for slots in state.slots.values():
                for s in slots:
                    s.step = None
                    s.compiled_once.set()
            if not state.warned:
                state.warned = True
                log.warning("compiled decoding failed (%s: %s); this model decodes eagerly from now on",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        slot.step = None

    # -- warm-up --
    def warm_up(self, model: Gemma3LM, batch_size: int = 1, max_length: int | None = None) -> list[int]:
        """Compile the decode step for every bucket up to `max_length` (default: the context length),
        so that the first requests do not wait; returns the buckets compiled. Does nothing where the
        default is eager. Safe to run in a background thread while requests are served."""
        if not self.wants_compiled(model):
            return []
        limit = bucket_length(max_length or model.config.context_length)
        buckets, length = [], MIN_BUCKET
        while length <= limit:
            buckets.append(length)
            length *= 2
        done = []
        for length in buckets:
            with self.lease(model, batch_size, length, compiled=True) as slot:
                if slot.step is None:
                    break
                token = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
                position = torch.zeros((), dtype=torch.long, device=model.device)
                with torch.no_grad():
                    self.step(model, slot, token, position)
                if slot.step is None:
                    break
                done.append(length)
        return done


ENGINE = Engine()


def warm_up(model: Gemma3LM, batch_size: int = 1, max_length: int | None = None) -> list[int]:
    """`Engine.warm_up` on the process's engine."""
    return ENGINE.warm_up(model, batch_size, max_length)


def warm_up_in_background(model: Gemma3LM) -> threading.Thread:
    """Warm up in a daemon thread (an app calls this when it loads a model); errors are logged."""

    def run() -> None:
        try:
            ENGINE.warm_up(model)
        except Exception:  # never take the app down: requests fall back to eager
            log.exception("warming up the decode step failed")

    thread = threading.Thread(target=run, name="slm-warm-up", daemon=True)
    thread.start()
    return thread


# ----- generation --------------------------------------------------------------------------------
def _as_batch(input_ids: Sequence[int] | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, bool]:
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids), dtype=torch.long)
    batched = ids.dim() == 2
    ids = ids if batched else ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token")
    return ids.to(device=device, dtype=torch.long), batched


NAN_MESSAGE = ("the model's output is NaN: its weights are probably broken (a diverged run, or a checkpoint "
               "saved with NaN values)")


def _device_tokens(
    model: Gemma3LM, ids: torch.Tensor, max_new_tokens: int, params: SamplingParams, compiled: bool | None,
    engine: Engine,
) -> Iterator[torch.Tensor]:
    """New tokens (B,) on the device, one per step; never waits for the device."""
    generator = params.generator(model.device)
    # Grad mode is thread-local and a generator may be resumed on another thread (a web server does
    # this), or interleaved with another one, so no context stays open across a `yield`.
    with engine.lease(model, ids.shape[0], ids.shape[1] + max_new_tokens, compiled) as slot:
        with torch.no_grad():
            logits = model(ids, cache=slot.cache, last_only=True)[:, -1]
            position = torch.tensor(ids.shape[1], device=model.device)
        for step in range(max_new_tokens):
            with torch.no_grad():
                token = sample(logits, params, generator)
            yield token
            if step + 1 < max_new_tokens:
                with torch.no_grad():
                    logits = engine.step(model, slot, token[:, None], position)
                    position.add_(1)


def _checked_params(max_new_tokens: int, params: SamplingParams) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")


def stream_generate(
    model: Gemma3LM,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
    compiled: bool | None = None,
    engine: Engine | None = None,
) -> Iterator[int | torch.Tensor]:
    """Yield new tokens one at a time: an int for a 1-D prompt, a (B,) tensor for a (B, T) batch.

    Sampling comes as `params` (a SamplingParams) or as the keywords. Stops after `max_new_tokens`,
    or once every row has produced one of the stop ids (the stop token itself is yielded).
    `compiled` forces the compiled decode step on or off (default: `Engine.wants_compiled`).
    """
    params = as_params(params, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       stop_token_ids=stop_token_ids)
    _checked_params(max_new_tokens, params)
    ids, batched = _as_batch(input_ids, model.device)
    if max_new_tokens == 0:
        return
    stops = torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long, device=model.device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=model.device)
    tokens = _device_tokens(model, ids, max_new_tokens, params, compiled, engine or ENGINE)
    try:
        for token in tokens:
            if not batched:
                value = int(token[0])  # the host needs it now: this is the one sync per token
                if value == NAN_TOKEN:
                    raise ValueError(NAN_MESSAGE)
                yield value
                if value in params.stop_ids:
                    return
                continue
            if bool((token == NAN_TOKEN).any()):
                raise ValueError(NAN_MESSAGE)
            yield token
            if stops.numel():
                finished |= torch.isin(token, stops)
                if bool(finished.all()):
                    return
    finally:
        tokens.close()


def generate(
    model: Gemma3LM,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
    compiled: bool | None = None,
    engine: Engine | None = None,
) -> list[int] | torch.Tensor:
    """The new token ids (a list for a 1-D prompt, a (B, n) tensor for a batch); temperature 0 is greedy.

    Equals what `stream_generate` yields, but looks at the tokens (a host sync) only every
    STOP_CHECK_EVERY steps, so the device runs ahead.
    """
    params = as_params(params, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       stop_token_ids=stop_token_ids)
    _checked_params(max_new_tokens, params)
    ids, batched = _as_batch(input_ids, model.device)
    out = torch.empty(ids.shape[0], 0, dtype=torch.long)
    if max_new_tokens > 0:
        stops = torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long)
        seen = torch.zeros(ids.shape[0], dtype=torch.bool)
        pending: list[torch.Tensor] = []
        tokens = _device_tokens(model, ids, max_new_tokens, params, compiled, engine or ENGINE)
        try:
            for step, token in enumerate(tokens):
                pending.append(token)
                if len(pending) < STOP_CHECK_EVERY and step + 1 < max_new_tokens:
                    continue
                chunk = torch.stack(pending, dim=1).cpu()
                pending = []
                if bool((chunk == NAN_TOKEN).any()):
                    raise ValueError(NAN_MESSAGE)
                done_at = None
                if stops.numel():
                    hit = torch.isin(chunk, stops)
                    # the step at which every row has produced a stop token, if within this chunk
                    all_seen = (seen[:, None] | hit.int().cummax(dim=1).values.bool()).all(dim=0)
                    if bool(all_seen.any()):
                        done_at = int(all_seen.int().argmax())
                    seen |= hit.any(dim=1)
                if done_at is not None:
                    out = torch.cat((out, chunk[:, : done_at + 1]), dim=1)
                    break
                out = torch.cat((out, chunk), dim=1)
        finally:
            tokens.close()
    if batched:
        return out.to(model.device)
    return out[0].tolist()
