"""Linear layers with their weights packed once into oneDNN's blocked layout, for serving on CPU.

A plain `nn.Linear` on CPU hands its weight to oneDNN in torch's row-major layout, and oneDNN reorders it for its
kernel on every call; packed once at load, each call skips that. Measured on this project's 2-core machine
(SmolLM2-135M's 210 linears of one decode step, bf16): 29.2 -> 21.7 ms at 12 rows, 35.2 -> 20.1 at 16; fp32 54.3 ->
27.4 at 12; the same results, bit for bit in bf16. This is how PyTorch's own compiler (inductor) runs linears on CPU
(`mkldnn._linear_pointwise`); the weights are packed only where that op exists, and only for dtypes oneDNN runs
natively on this CPU.
"""

from __future__ import annotations

import torch


class PackedLinear(torch.nn.Module):
    """An `nn.Linear`, for inference only, its weight in oneDNN's layout (`rows`: the batch it is packed for)."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def can_pack(dtype: torch.dtype) -> bool:
    """oneDNN is there and runs `dtype` natively (bf16 needs AVX-512 BF16 or AMX: without, it would be emulated)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Smaller weights stay as they are: there the packed op's call costs more than the reorder it saves (the tiny test
# model, 128 wide: ~10% fewer tokens/s with all packed). SmolLM2-135M's smallest linear has 110,592 weights.
MIN_PACKED_WEIGHTS = 65536


def pack_linears(model: torch.nn.Module, rows: int) -> int:
    """Every plain `nn.Linear` of a CPU model with at least MIN_PACKED_WEIGHTS weights of a dtype that can be packed,
    replaced by a PackedLinear; how many were. A head tied to the embeddings gets a packed copy of its own (the
    embeddings keep theirs)."""
    packed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            weight = child.weight if type(child) is torch.nn.Linear else None
            if weight is not None and weight.device.type == "cpu" and weight.numel() >= MIN_PACKED_WEIGHTS \
                    and can_pack(weight.dtype):
                setattr(module, name, PackedLinear(child, rows))
                packed += 1
    return packed
