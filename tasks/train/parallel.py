"""How the model is spread over the training processes: the run's resolved `parallelism`.

ddp: every process holds the whole model, its fp32 gradients and AdamW states (16 bytes a parameter each), and the
    gradients are summed over the processes once a step (tasks.train.distributed.sum_gradients).
fsdp: FSDP2 (`fully_shard`) per decoder layer, then the root (embeddings, final norm, head): each process holds
    1/N of the weights, gradients and AdamW states as DTensors, gathers one layer's weights at a time for its forward
    and backward, and reduce-scatters the gradients of each micro-batch, summed, not averaged (the loss is already
    divided by the step's trained tokens over all ranks). No process ever holds a full fp32 copy: the model is built
    on the meta device, sharded, and rank 0 alone reads the weights file and broadcasts it; the final model is
    gathered to rank 0's CPU only. What differs for the loop is in `Parallelism`: a forward every rank must run
    (FSDP's gathers are collectives), and after one without a backward, the root's weights are sharded again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tasks.train import distributed
from tasks.train.loss import FUSED_LOSS, fused_loss_sum


class Parallelism:
    """What the worker does differently for ddp and fsdp, in the order the loop needs it."""

    def __init__(self, kind: str, world: int, device: torch.device, compute: torch.dtype):
        self.sharded, self.world, self.device, self.compute = kind == "fsdp", world, device, compute

    @property
    def every_rank_runs_forwards(self) -> bool:
        """Whether an evaluation's generations run on every rank (FSDP gathers layers collectively), not rank 0 alone."""
        return self.sharded

    def shard(self, model) -> None:
        """fully_shard each decoder layer, then the root, in place (FSDP2); bf16 compute gathers bf16 weights and
        reduces gradients in fp32. The fused loss (tasks.train.loss) runs the decoder and reads the head's weight
        itself, outside the model's forward: registered as a forward method, FSDP gathers the root's weights for it."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(self.device.type, (self.world,))
        bf16 = self.compute != torch.float32
        policy = MixedPrecisionPolicy(param_dtype=self.compute if bf16 else None, reduce_dtype=torch.float32)
        for layer in model.base_model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        for module in model.modules():
            if hasattr(module, "set_gradient_divide_factor"):  # a sum over the ranks, as ddp's all-reduce
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one
        setattr(model, FUSED_LOSS, lambda ids, labels, pos: fused_loss_sum(model, ids, labels, pos))
        register_fsdp_forward_method(model, FUSED_LOSS)

    def load(self, model_class, config, weights: str, attn_implementation: str, prepare) -> torch.nn.Module:
        """The model from `weights`, sharded: built on the meta device, `prepare(model)` (activation checkpointing,
        compile), sharded, materialized empty on the device, the buffers no checkpoint carries recomputed (rotary
        frequencies), then rank 0's read of the file broadcast to every rank's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        with torch.device("meta"):
            model = model_class.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
        prepare(model)
        self.shard(model)
        model.to_empty(device=self.device)
        recompute_buffers(model, self.device)
        full = {}
        if dist.get_rank() == 0:
            full = model_class.from_pretrained(weights, dtype=torch.float32, attn_implementation=attn_implementation).state_dict()
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
        return model

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """After a step's micro-batches: ddp sums the gradients over the ranks; FSDP has reduce-scattered them already."""
        if self.world > 1 and not self.sharded:
            distributed.sum_gradients(params)

    def settle(self, model) -> None:
        """After forwards without a backward (evaluation, generation): FSDP leaves the root's weights gathered; shard
        them again before the next step or checkpoint (else the optimizer's state dict fails: STACK.md)."""
        if self.sharded:
            model.reshard()

    def full_model(self, model, model_class, attn_implementation: str):
        """The trained model whole, on rank 0 (None elsewhere): the model itself for ddp; for fsdp, its weights
        gathered to rank 0's CPU (every rank takes part) into a model built there."""
        if not self.sharded:
            return model if dist.get_rank() == 0 else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        with torch.device("meta"):
            whole = model_class.from_config(model.config, dtype=torch.float32, attn_implementation=attn_implementation)
        whole.load_state_dict(full, assign=True, strict=False)
        whole.tie_weights()
        whole.generation_config = model.generation_config  # the base model's, as a ddp run saves it
        recompute_buffers(whole, torch.device("cpu"))
        return whole


def recompute_buffers(model, device: torch.device) -> None:
    """The buffers that no state dict carries (non-persistent: rotary frequencies), which a model built on the meta
    device has as garbage after to_empty, or still on meta after load_state_dict(assign=True): recomputed on
    `device` by transformers' own initializer for the module."""
    for module in model.modules():
        transient = [name for name in module._non_persistent_buffers_set if getattr(module, name, None) is not None]
        if not transient:
            continue
        if "RotaryEmbedding" not in type(module).__name__:
            raise RuntimeError(f"{type(module).__name__} has buffers that no checkpoint carries ({', '.join(transient)}); "
                               "parallelism fsdp cannot rebuild them: set training_config parallelism: ddp")
        for name in transient:
            buffer = getattr(module, name)
            module.register_buffer(name, torch.empty(buffer.shape, dtype=buffer.dtype, device=device), persistent=False)
        model._init_weights(module)
