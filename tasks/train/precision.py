"""Precision: fp32 master weights and AdamW states always; the run's resolved `precision` (tessera.core.training.
resolve_precision says when it is bf16) only sets the dtype matmuls compute in, through autocast, which
casts copies of the weights for each op. AdamW therefore never steps bf16 weights."""

from __future__ import annotations

import contextlib

import torch


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("precision bf16: this CUDA device does not support bf16; set training_config precision: fp32")
    return torch.bfloat16


def autocast(dtype: torch.dtype, device: torch.device):
    """Compute in `dtype` over fp32 weights (nothing to do for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
