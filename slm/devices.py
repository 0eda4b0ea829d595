"""Where a run trains: the device, the autocast precision, and the process's place under torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .train_config import DTYPES


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed:
    """The process's place in a torchrun job (a single process when not launched by torchrun)."""
    return Distributed(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def autocast_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). Weights always stay fp32: they are the master copy."""
    dtype = DTYPES[requested]
    if dtype is None:  # auto
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    return None if dtype == torch.float32 else dtype


def describe_device(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        name = f"CPU ({torch.get_num_threads()} threads)"
    else:
        name = device.type.upper()
    return f"{name} x{world_size}" if world_size > 1 else name


def native_bf16(device: torch.device) -> bool:
    """bf16 where the hardware has it, not merely emulated: GPUs from Ampere on (not T4, V100), and
    CPUs with bf16 instructions (AVX512-BF16, AMX), where bf16 GEMMs run about twice as fast as fp32."""
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up with care
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        return torch.cuda.get_device_capability(device)[0] >= 8
