"""The training loss, chunked: logits are made only for the trained positions, a chunk at a time.

A model's own forward would materialize logits for every position of the micro-batch (rows x context x
vocabulary, in fp32 for the loss: 1.6 GB for 8 rows of 1024 tokens and a 49k vocabulary, and a second
copy for the gradient). Here the decoder runs without its head, the hidden states of trained positions
are gathered, and when they take more than one chunk each chunk's logits are computed under checkpointing:
only one chunk's logits exist at a time, in the forward pass and again in the backward pass. One chunk is
kept for the backward pass instead: recomputing it would cost a forward of the head and save no memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tessera.training import IGNORE_INDEX

LOSS_CHUNK_BYTES = 256 * 1024**2  # fp32 logits of one chunk


def chunk_tokens(vocab_size: int) -> int:
    return max(64, LOSS_CHUNK_BYTES // (4 * vocab_size))


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def loss_sum(model, ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the trained tokens (labels != IGNORE_INDEX).

    No attention mask and no KV cache: with position ids restarting at 0 for each packed example,
    transformers builds a block-causal mask, so packed examples never attend to each other.
    """
    hidden = model.base_model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][trained], targets[trained]
    weight = model.get_output_embeddings().weight
    step = chunk_tokens(weight.shape[0])
    if targets.numel() <= step:
        return _chunk_loss(hidden, targets, weight)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), step):
        total = total + checkpoint(
            _chunk_loss, hidden[start : start + step], targets[start : start + step], weight, use_reentrant=False
        )
    return total
