"""The training loss, fused with the output layer: logits only for the trained positions, a chunk at a time,
and their gradients computed on the spot.

A model's own forward would materialize logits for every position of the micro-batch (rows x context x
vocabulary, in fp32 for the loss: 1.6 GB for 8 rows of 1024 tokens and a 49k vocabulary, and more copies
for autograd's log-softmax and its gradient). Here the decoder runs without its head, the hidden states of
trained positions are gathered, and LinearCrossEntropy takes them a chunk at a time: the chunk's logits,
its log-softmax (the loss), then at once the gradient of the logits (softmax minus one-hot) and from it the
gradients of the hidden states and of the head's weight. Only one chunk's logits exist at a time, nothing is
recomputed in the backward pass (which only scales the stored gradients), and the slow generic log-softmax
backward kernel never runs: on CPU a training step of the tiny benchmark model is ~15% faster for it.
"""

from __future__ import annotations

import torch

from tessera.core.training import IGNORE_INDEX, loss_chunk_tokens


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would run the head's matmul in, or None outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, grads: bool):
    """Summed cross-entropy of h @ w.T (both in the compute dtype), a chunk of positions at a time; with `grads`,
    also the gradients of h and of w (fp32), from each chunk's softmax while its logits exist."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grads else None
    step = loss_chunk_tokens(w.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, targets.numel(), step):
            hc, tc = h[start : start + step], targets[start : start + step]
            log_probs = torch.log_softmax(hc @ w.T, dim=1, dtype=torch.float32)
            total -= log_probs.gather(1, tc[:, None]).sum()
            if grads:
                grad_logits = log_probs.exp_()  # softmax, in place
                grad_logits[torch.arange(tc.numel(), device=tc.device), tc] -= 1
                grad_logits = grad_logits.to(h.dtype)
                grad_h[start : start + step] = grad_logits @ w
                grad_w += grad_logits.T @ hc
    return total, grad_h, grad_w


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden_i @ weight.T, target_i), its gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        # autocast's casts, made once for every chunk
        total, grad_hidden, grad_weight = chunked_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, grads=True)
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight * grad_total.to(grad_weight.dtype), None, None


# A sharded model (tasks.train.parallel) has the fused loss as a method of its own under this name, registered with
# FSDP as a forward: it runs the decoder and reads the head's weight outside the model's forward.
FUSED_LOSS = "tessera_loss_sum"


def loss_sum(model, ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the trained tokens (labels != IGNORE_INDEX): through the model's own
    FUSED_LOSS method when it has one (a sharded model), else fused_loss_sum."""
    method = getattr(model, FUSED_LOSS, None)
    return method(ids, labels, pos) if method is not None else fused_loss_sum(model, ids, labels, pos)


def fused_loss_sum(model, ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """loss_sum, with the model's weights at hand. No attention mask and no KV cache: with position ids restarting
    at 0 for each packed example, transformers builds a block-causal mask, so packed examples never attend to each
    other."""
    hidden = model.base_model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][trained], targets[trained]
    weight = model.get_output_embeddings().weight
    dtype = autocast_dtype(hidden.device) or hidden.dtype
    if torch.is_grad_enabled():
        return LinearCrossEntropy.apply(hidden, weight, targets, dtype)
    return chunked_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, grads=False)[0]  # evaluation
