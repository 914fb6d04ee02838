"""The fused loss (tasks/train/loss.py) against autograd, and the output layers it refuses to train."""

from __future__ import annotations

import pytest
import torch

from tasks.train import loss as fused
from tessera.core import training

V, D, N = 300, 32, 150  # vocabulary, hidden size, trained positions


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scale", [1.0, 1 / 37], ids=["unscaled", "scaled"])
def test_gradients_of_hidden_states_and_head_weight_match_autograd(monkeypatch, tied, scale):
    """fp32, several chunks: the gradients the forward pass computes are autograd's, to 1e-5. With tied embeddings
    the head weight is also the input embedding, so its gradient adds both uses; `scale` is the loss normalizer
    (loss / trained tokens) that the backward pass applies."""
    monkeypatch.setattr(training, "LOSS_CHUNK_BYTES", 64 * 4 * V)  # 64 positions a chunk: 3 chunks
    torch.manual_seed(0)
    weight = torch.randn(V, D, dtype=torch.float64).float().requires_grad_()
    targets = torch.randint(0, V, (N,))

    def hidden_states():
        base = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
        h = base + weight[torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))] if tied else base
        return h.requires_grad_() if h.is_leaf else h

    grads = []
    for compute in (
        lambda h: fused.LinearCrossEntropy.apply(h, weight, targets, torch.float32),
        lambda h: torch.nn.functional.cross_entropy(h @ weight.T, targets, reduction="sum"),
    ):
        weight.grad = None
        h = hidden_states()
        h.retain_grad()
        total = compute(h)
        (total * scale).backward()
        grads.append((total.detach(), h.grad.clone(), weight.grad.clone()))
    (ours_loss, ours_h, ours_w), (ref_loss, ref_h, ref_w) = grads
    assert ours_loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(ours_h, ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_w, ref_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("config", "head_bias", "named"),
    [
        ({"final_logit_softcapping": 30.0}, False, "final_logit_softcapping"),
        ({"logit_scale": 0.0625}, False, "logit_scale"),
        ({}, True, "bias on the output layer"),
    ],
)
def test_output_layers_the_fused_loss_does_not_compute_are_named(config, head_bias, named):
    from tessera.core.training import unsupported_head_feature

    assert named in unsupported_head_feature(config, head_bias)
    assert unsupported_head_feature({"final_logit_softcapping": None, "logit_scale": 1.0}) is None


def test_a_soft_capped_model_is_refused_before_any_data_is_read(home, tiny_model_dir, tmp_path):
    import json
    import shutil

    from tessera.core.catalog import resolve_model
    from tessera.core.errors import ConfigError

    capped = tmp_path / "capped"
    shutil.copytree(tiny_model_dir, capped)
    config = json.loads((capped / "config.json").read_text())
    (capped / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    with pytest.raises(ConfigError, match=r"capped: final logit soft-capping \(final_logit_softcapping"):
        resolve_model(str(capped))
