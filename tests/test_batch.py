"""The serving engine's continuous batch (tasks.serve.batch), in-process on the tiny model in fp32: whatever joins,
leaves, waits or is prefilled in parts beside it, each greedy sequence is the one `generate` makes for its prompt
alone; sequences that sample run beside greedy ones without changing them; a cancelled one stops."""

from __future__ import annotations

import threading

import pytest


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """(the model the batch drives, a second copy for `generate`): the batch plugs its attention into its model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()  # noqa: E731
    return load(), load()


class Collector:
    """Jobs' emitted results, and a way to wait for all of them to finish."""

    def __init__(self):
        self.finished: dict[int, tuple[list[int], str | None]] = {}
        self.streamed: dict[int, list[list[int]]] = {}
        self.done = threading.Condition()

    def job(self, key: int, ids: list[int], max_new_tokens: int, temperature: float = 0.0, stream: bool = True):
        from tasks.serve.batch import Job

        def emit(tokens, finished, error):
            with self.done:
                if finished:
                    self.finished[key] = (tokens, error)
                    self.done.notify_all()
                else:
                    self.streamed.setdefault(key, []).append(tokens)

        return Job(ids, max_new_tokens, temperature, 0.9, frozenset(), emit, stream=stream)

    def wait(self, keys) -> None:
        with self.done:
            assert self.done.wait_for(lambda: all(k in self.finished for k in keys), timeout=60), sorted(self.finished)


def alone(model, ids: list[int], new_tokens: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_every_greedy_sequence_is_its_answer_alone_whatever_runs_beside_it(models):
    from tasks.serve.batch import DenseBatch

    served, reference = models
    prompts = {k: [(7 * k + 3 * i) % 1000 + 1 for i in range(5 + 6 * k)] for k in range(8)}  # 5..47 tokens
    new_tokens = {k: 4 + 5 * k for k in prompts}  # 4..39
    # prompts prefilled in parts of at most 16 tokens together with the running sequences' steps; a cache so small
    # that later sequences wait for earlier ones to end
    batch = DenseBatch(served, kv_cache_tokens=200, max_batch_tokens=16, max_rows=8)
    results = Collector()
    try:
        for k in range(4):
            batch.submit(results.job(k, prompts[k], new_tokens[k], stream=k % 2 == 0))
        results.wait([0])  # the rest join a batch that is already running
        for k in range(4, 8):
            batch.submit(results.job(k, prompts[k], new_tokens[k]))
        sampler = results.job(99, prompts[3], 30, temperature=1.0)
        batch.submit(sampler)
        results.wait(list(prompts) + [99])
        assert batch.in_progress() == 0
    finally:
        batch.close()
    for k, ids in prompts.items():
        tokens, error = results.finished[k]
        assert error is None
        assert tokens == alone(reference, ids, new_tokens[k]), k
    # streamed: every token as it is made, each result the one before it and one more token
    assert [len(s) for s in results.streamed[0]] == list(range(1, new_tokens[0]))
    assert 1 not in results.streamed  # not streamed: only the finished sequence
    assert len(results.finished[99][0]) == 30


def test_a_sequence_ends_at_a_stop_token_and_a_cancelled_one_stops(models):
    from tasks.serve.batch import DenseBatch

    served, reference = models
    ids = [11, 12, 13, 14, 15]
    expected = alone(reference, ids, 12)
    batch = DenseBatch(served, kv_cache_tokens=4096, max_batch_tokens=64, max_rows=4)
    results = Collector()
    try:
        stop_at = expected[5]
        stopping = results.job(1, ids, 12)
        stopping.stop_ids = frozenset({stop_at})
        endless = results.job(2, [1, 2, 3], 480)
        batch.submit(endless)
        batch.submit(stopping)
        results.wait([1])
        assert results.finished[1][0] == expected[: expected.index(stop_at) + 1]  # the stop token is its last
        assert batch.in_progress() == 1
        batch.cancel(endless)
        for _ in range(200):
            if batch.in_progress() == 0:
                break
            threading.Event().wait(0.01)
        assert batch.in_progress() == 0 and 2 not in results.finished  # dropped, nothing more said of it
    finally:
        batch.close()


def test_each_row_of_the_cache_holds_its_own_sequence_as_rows_end_and_others_move_into_them(models):
    """Driven step by step (the loop's thread stopped): after every step, each running sequence's row holds the keys
    and values a forward of its own tokens alone makes, also after it moved into the row of one that ended."""
    import torch

    from tasks.serve.batch import DenseBatch, Job

    served, reference = models
    batch = DenseBatch(served, kv_cache_tokens=4096, max_batch_tokens=8, max_rows=8)
    batch.close()
    lengths = [(6, 3), (13, 20), (4, 5), (9, 25), (17, 8)]  # (prompt, new tokens): rows end out of order
    batch.waiting = [Job([(5 * k + i) % 900 + 1 for i in range(p)], n, 0.0, 1.0, frozenset(), lambda *_: None, stream=False)
                     for k, (p, n) in enumerate(lengths)]
    moved, steps = False, 0
    with torch.inference_mode():
        while batch.running or batch.waiting:
            slots = {id(job): job.slot for job in batch.running}
            batch._admit()
            batch._step()
            steps += 1
            moved |= any(slots.get(id(job), job.slot) != job.slot for job in batch.running)
            for job in batch.running:
                written = job.prefilled + max(len(job.tokens) - 1, 0)  # the newest token is fed (and written) next
                if not written:  # waiting for its first part
                    continue
                alone = reference(torch.tensor([(job.ids + job.tokens)[:written]]), use_cache=True).past_key_values
                for layer, own in enumerate(alone.layers):
                    torch.testing.assert_close(batch.cache.keys[layer][job.slot, :, :written], own.keys[0], atol=1e-4, rtol=1e-4)
                    torch.testing.assert_close(batch.cache.values[layer][job.slot, :, :written], own.values[0], atol=1e-4, rtol=1e-4)
    assert moved and steps > 25


def test_a_sliding_window_layer_sees_only_its_window(models):
    """A model whose second layer attends to the last 6 positions only (Qwen2's sliding window; Mistral v0.1 and
    Gemma have such layers too), prompts and answers far longer than that, prefilled in parts of 4: each greedy
    sequence is its answer alone, which `generate` makes with the window applied."""
    import copy

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tasks.serve.batch import DenseBatch

    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, use_sliding_window=True, sliding_window=6,
                         max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    reference = Qwen2ForCausalLM(config).eval()
    served = copy.deepcopy(reference)
    prompts = {k: [(7 * k + 11 * i) % 299 + 1 for i in range(9 + 5 * k)] for k in range(4)}  # 9..24 tokens
    batch = DenseBatch(served, kv_cache_tokens=4096, max_batch_tokens=4, max_rows=4)
    results = Collector()
    try:
        for k, ids in prompts.items():
            batch.submit(results.job(k, ids, 24))
        results.wait(list(prompts))
    finally:
        batch.close()
    for k, ids in prompts.items():
        assert results.finished[k] == (alone(reference, ids, 24), None), k


def test_a_model_whose_attention_the_batch_cannot_run_is_refused_before_serving():
    """Gemma 2 soft-caps its attention logits, which the batch's attention does not: refused as the batch starts, with
    the reason, instead of failing every request."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tasks.serve.batch import DenseBatch
    from tessera.core.errors import ConfigError

    config = Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attn_logit_softcapping=50.0)
    with pytest.raises(ConfigError, match="Gemma2ForCausalLM cannot be served here: Gemma2Attention needs attention soft-capping, which"):
        DenseBatch(Gemma2ForCausalLM(config).eval(), kv_cache_tokens=4096, max_batch_tokens=64, max_rows=4)


def test_all_of_the_models_work_is_done_in_the_batchs_own_thread(tiny_model_dir):
    """On CPU a second live thread that ran torch's parallel work made every step ~50% slower (tasks.serve.batch,
    tasks.serve.loading.in_passing_thread): the model is loaded in a thread that ends, and packed, tried and run in the batch's."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.serve.batch import DenseBatch
    from tasks.serve.loading import in_passing_thread
    from tasks.serve.packed_linear import PackedLinear

    model = in_passing_thread(lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval())
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tessera-load")]  # the loader's thread ended
    ran_in: set[str] = set()
    model.register_forward_pre_hook(lambda *_: ran_in.add(threading.current_thread().name))
    batch = DenseBatch(model, kv_cache_tokens=4096, max_batch_tokens=64, max_rows=4)
    results = Collector()
    try:
        assert ran_in == {"tessera-batch"}  # the first forward, before serving
        batch.submit(results.job(1, [3, 4, 5], 6))
        results.wait([1])
    finally:
        batch.close()
    assert ran_in == {"tessera-batch"} and len(results.finished[1][0]) == 6
    assert any(type(m) is PackedLinear for m in model.modules()) or not torch.backends.mkldnn.is_available()
    with pytest.raises(ValueError, match="invalid literal"):  # what the load raises is raised in the caller
        in_passing_thread(lambda: int("not a number"))
