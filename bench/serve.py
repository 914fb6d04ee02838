"""Serving throughput: our continuous-batching endpoint against one request at a time with plain `generate`.

Both are the same BentoML service over the same registered model (tessera/tiny-chat, random init), called over HTTP
on 127.0.0.1 with requests of 64 new tokens (end of turn ignored), at 1, 4 and 16 concurrent clients: tokens/s and
latency from whole (non-streamed) completions, time to first token from a second, streamed pass.
The in-process ceiling is one static left-padded batch of 16 through `model.generate`.

    python bench/serve.py [--new-tokens 64] [--requests-per-client 4]

Ends with: serve ours/baseline@16=<x> p99_ms=<n> ttft_p50_ms=<n>   (ours at 16 clients)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

CLIENTS = (1, 4, 16)


def one(client, url: str, prompt: str, new_tokens: int, stream: bool) -> tuple[float, float, int]:
    """(seconds to the first text, seconds in all, completion tokens) of one completion."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
    start = time.perf_counter()
    if not stream:
        response = client.post(f"{url}/v1/completions", json=body, timeout=600)
        response.raise_for_status()
        end = time.perf_counter()
        return end - start, end - start, response.json()["usage"]["completion_tokens"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    first, tokens = None, 0
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


def run_clients(url: str, clients: int, requests_per_client: int, new_tokens: int, stream: bool) -> tuple[list, float]:
    """Every request's (ttft, latency, tokens), and the wall time of all of them."""
    def client_loop(c: int) -> list[tuple[float, float, int]]:
        with httpx.Client() as client:
            return [one(client, url, f"request {c}-{i}: hello", new_tokens, stream) for i in range(requests_per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for per_client in pool.map(client_loop, range(clients)) for r in per_client]
    return results, time.perf_counter() - start


def load(url: str, clients: int, requests_per_client: int, new_tokens: int) -> dict:
    with httpx.Client() as warm:
        one(warm, url, "warm up", new_tokens, stream=False)
    whole, wall = run_clients(url, clients, requests_per_client, new_tokens, stream=False)
    streamed, _ = run_clients(url, clients, requests_per_client, new_tokens, stream=True)
    latencies = sorted(r[1] for r in whole)
    return {
        "tok_s": sum(r[2] for r in whole) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "ttft_p50_ms": 1000 * statistics.median(r[0] for r in streamed),
        "tokens": sum(r[2] for r in whole),
    }


def static_batch_ceiling(model_dir: Path, new_tokens: int, batch: int = 16) -> float:
    """Tokens/s of one left-padded batch of `batch` prompts through model.generate, in-process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    inputs = tokenizer([f"request {i}: hello" for i in range(batch)], return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return (out.shape[1] - inputs["input_ids"].shape[1]) * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=4)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="tessera-bench-serve-"))
    os.environ.update(TESSERA_HOME=str(home), HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", BENTOML_DO_NOT_TRACK="true")
    import mlflow
    import transformers

    from tasks.serve.model_server import start_endpoint
    from tasks.serve.settings import ServeSettings
    from tessera.core.tiny_model import build_tiny_chat
    from tessera.core.tracking import mlflow_client

    model_dir = build_tiny_chat(home / "models" / "tiny-chat")
    mlflow_client()
    with mlflow.start_run():
        mlflow.transformers.log_model(
            transformers_model=transformers.pipeline("text-generation", model=str(model_dir)), name="model",
            task="llm/v1/chat", registered_model_name="bench.serve.tiny", pip_requirements=[],
        )

    results = {}
    for engine in ("continuous", "sequential"):
        settings = ServeSettings(engine=engine, ignore_eos=True)
        os.environ.update(settings.as_env())
        with start_endpoint("models:/bench.serve.tiny/1", log_file=home / f"{engine}.log") as endpoint:
            for clients in CLIENTS:
                results[engine, clients] = r = load(endpoint.url, clients, args.requests_per_client, args.new_tokens)
                print(f"{engine:>10} @{clients:<2}  {r['tok_s']:7.0f} tok/s  p50 {r['p50_ms']:6.0f} ms  p99 {r['p99_ms']:6.0f} ms"
                      f"  ttft p50 {r['ttft_p50_ms']:6.0f} ms  ({r['tokens']} tokens)", flush=True)
    ceiling = static_batch_ceiling(model_dir, args.new_tokens)
    print(f"in-process ceiling: one static batch of 16 through generate: {ceiling:.0f} tok/s")
    for clients in CLIENTS:
        ratio = results["continuous", clients]["tok_s"] / results["sequential", clients]["tok_s"]
        print(f"ours/baseline @{clients}: {ratio:.2f}x")
    ours = results["continuous", 16]
    ratio = ours["tok_s"] / results["sequential", 16]["tok_s"]
    print(f"serve ours/baseline@16={ratio:.2f} p99_ms={ours['p99_ms']:.0f} ttft_p50_ms={ours['ttft_p50_ms']:.0f}")


if __name__ == "__main__":
    main()
