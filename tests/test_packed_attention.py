"""Packed examples never see each other: each example's loss inside a packed row equals its loss alone.

The rows come from the real pipeline (prepare -> rows on disk), the batch from the trainer's own
reader, and the model is called as the trainer calls it: input_ids + position_ids, no attention
mask, use_cache=False. transformers then builds a block-causal mask from the restarting position ids.
That reader is also checked to need none of what a bare GPU machine's worker process should not import.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.prepare.rows import read_rows
from tasks.prepare.stage import prepare
from tasks.train.data import PackedRows
from tasks.train.loss import loss_sum
from tessera.core.config import build_run_config
from tessera.core.training import IGNORE_INDEX

from conftest import chat, write_jsonl


def tiny_llama(vocab_size: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def token_losses(model, ids, pos, labels, **call) -> torch.Tensor:
    """Per-position next-token loss (0 where untrained), from logits computed as the trainer computes them."""
    logits = model(input_ids=ids, position_ids=pos, **call).logits
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    return F.pad(losses, (1, 0))  # losses[:, k] is the loss of predicting token k


@pytest.fixture
def packed_rows(home, tokenizer):
    """Prepared chat rows of 96 tokens: several examples of varied length share each row."""
    records = [chat(f"question {i} " + "why " * (i % 7), "answer " * (1 + i % 9) + str(i)) for i in range(24)]
    path = write_jsonl(home / "chat.jsonl", records)
    config = build_run_config(model="tessera/tiny-chat", train_data_path=str(path), register_to="main.t", context_length=96)
    path = prepare(config).path
    rows = [row for part in read_rows(path) for row in part.to_arrow().to_pylist()]
    assert any(sum(p == 0 for p in r["position_ids"]) >= 3 for r in rows), "the test needs rows holding several examples"
    return rows, PackedRows(path)


def collate(packed_rows, indices, pad):
    return packed_rows[1].batch(np.asarray(indices), pad)


def examples_of(row: dict) -> list[tuple[int, int]]:
    """[start, end) of each example in a row: a new example wherever position_ids restart at 0."""
    starts = [k for k, p in enumerate(row["position_ids"]) if p == 0]
    return list(zip(starts, starts[1:] + [len(row["position_ids"])]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_packed_example_has_the_loss_it_has_alone(packed_rows, tokenizer, attn):
    model = tiny_llama(len(tokenizer), attn)
    ids, labels, pos = collate(packed_rows, range(len(packed_rows[0])), tokenizer.pad_token_id)  # padded, as the trainer trains
    packed_rows = packed_rows[0]
    trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        packed = token_losses(model, ids, pos, labels, use_cache=False)
        packed_total = loss_sum(model, ids, labels, pos)
        alone_total, compared = 0.0, 0
        for r, row in enumerate(packed_rows):
            for start, end in examples_of(row):
                alone = token_losses(model, ids[r:r + 1, start:end], pos[r:r + 1, start:end], labels[r:r + 1, start:end], use_cache=False)
                torch.testing.assert_close(packed[r:r + 1, start:end], alone, rtol=1e-4, atol=1e-5)
                alone_total += float(alone.sum())
                compared += 1
    assert compared == 24
    assert trained == sum(1 for row in packed_rows for label in row["labels"] if label != IGNORE_INDEX)
    assert float(packed_total) == pytest.approx(float(packed.sum()), rel=1e-5)
    assert float(packed_total) / trained == pytest.approx(alone_total / trained, rel=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_with_the_kv_cache_on_packed_examples_leak(packed_rows, tokenizer, attn):
    """The trap the trainer avoids with use_cache=False (STACK.md): the default call attends across examples."""
    model = tiny_llama(len(tokenizer), attn)
    at, row = next((i, r) for i, r in enumerate(packed_rows[0]) if len(examples_of(r)) >= 2)
    ids, labels, pos = collate(packed_rows, [at], tokenizer.pad_token_id)
    start, end = examples_of(row)[1]
    with torch.no_grad():
        default_call = model(input_ids=ids, position_ids=pos).logits[0, start:end]
        alone = model(input_ids=ids[:, start:end], position_ids=pos[:, start:end], use_cache=False).logits[0]
        isolated = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, start:end]
    torch.testing.assert_close(isolated, alone, rtol=1e-4, atol=1e-5)
    assert (default_call - alone).abs().max() > 1e-2


def test_the_worker_reads_its_rows_without_datasets_pandas_prefect_or_mlflow(home):
    """One worker process starts per rank, on a machine that may have only torch and transformers: it reads the prepared
    rows with pyarrow alone (`datasets` would bring pandas and most of a second of imports), and imports MLflow only
    where rank 0 reports to it."""
    path = write_jsonl(home / "chat.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(8)])
    config = build_run_config(model="tessera/tiny-chat", train_data_path=str(path), register_to="main.t", context_length=64)
    prepared = prepare(config)
    code = (
        "import sys\n"
        "import tasks.train.worker\n"
        "from tasks.train.data import PackedRows\n"
        f"rows = PackedRows({prepared.path!r})\n"
        "rows.batch(rows.tokens.argsort(), 0)\n"
        "print(len(rows), sorted({'datasets', 'pandas', 'prefect', 'mlflow'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == f"{prepared.stats.rows} []"


def test_a_rank_without_rows_gets_one_untrained_padding_row(packed_rows):
    """A sharded model's every forward is a collective: a rank whose share of a step is empty must still run one."""
    ids, labels, pos = collate(packed_rows, [], 7)
    assert ids.tolist() == [[7]] and labels.tolist() == [[IGNORE_INDEX]] and pos.tolist() == [[0]]
