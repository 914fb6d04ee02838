"""tasks.serve.packed_linear: the served model's linears packed into oneDNN's layout give the model's own results."""

from __future__ import annotations

import copy

import pytest


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_a_model_with_packed_linears_gives_its_own_logits(tiny_model_dir, dtype_name, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.serve import packed_linear
    from tasks.serve.packed_linear import PackedLinear, can_pack, pack_linears

    dtype = getattr(torch, dtype_name)
    if not can_pack(dtype):
        pytest.skip(f"oneDNN does not run {dtype_name} natively on this CPU: nothing is packed")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    linears = [m for m in plain.modules() if type(m) is torch.nn.Linear]
    large = [m for m in linears if m.weight.numel() >= packed_linear.MIN_PACKED_WEIGHTS]
    assert 0 < len(large) < len(linears)  # the tiny model's head is large enough, its layers' linears are not
    assert pack_linears(copy.deepcopy(plain), rows=16) == len(large)
    monkeypatch.setattr(packed_linear, "MIN_PACKED_WEIGHTS", 0)  # every linear, for the logits below
    packed = copy.deepcopy(plain)
    assert pack_linears(packed, rows=16) == len(linears)
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert sum(type(m) is PackedLinear for m in packed.modules()) == len(linears)
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 500, 3]])
    with torch.inference_mode():
        expected, got = plain(ids).logits, packed(ids).logits
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected)  # the same kernel's arithmetic, only the weight's layout differs
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
