"""Serving throughput: our continuous-batching endpoint against the same engine one sequence at a time.

Both are the same BentoML service (the baseline with TESSERA_SERVE_ENGINE=sequential: one running sequence) over
the same registered model (tessera/tiny-chat, random init), called over HTTP
on 127.0.0.1 with requests of 64 new tokens (end of turn ignored), at 1, 4 and 16 concurrent clients: tokens/s and
latency from whole (non-streamed) completions, time to first token from a second, streamed pass.
The in-process ceiling is one static left-padded batch of 16 through `model.generate`.

    python bench/serve.py [--new-tokens 64] [--requests-per-client 4]

Ends with: serve ours/baseline@16=<x> p99_ms=<n> ttft_p50_ms=<n>   (ours at 16 clients)

    python bench/serve.py --peer [--model smollm2|tiny]

compares our endpoint (`tessera serve`: router, BentoML, the continuous-batching engine) with the server a user
would pick instead, `transformers serve --continuous-batching` on the same weights, and with the ceiling: our
engine driven in-process, no HTTP. Chat requests, greedy, max_tokens 64, at 1, 4 and 16
clients (4 requests each, after a warm-up round): completion tokens/s and latency p99 from whole answers, TTFT p50
and p99 from a second, streamed pass. Both servers run at once and are measured in turns with the ceiling (in this
process, while both servers idle), `--rounds` times (2; each round's ratios at 16 clients are printed), and each
figure is the median over the rounds.
Ends with: serve ours/peer@16=<x> ours/ceiling@16=<y> ttft_p50_ms=<z>
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


def timed(client, url: str, path: str, body: dict, stream: bool) -> tuple[float, float, int]:
    """(seconds to the first text, seconds in all, completion tokens) of one request to `path` (completions or chat)."""
    start = time.perf_counter()
    if not stream:
        response = client.post(f"{url}{path}", json=body, timeout=600)
        response.raise_for_status()
        end = time.perf_counter()
        return end - start, end - start, response.json()["usage"]["completion_tokens"]
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    first, tokens = None, 0
    with client.stream("POST", f"{url}{path}", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            if (choice.get("text") or (choice.get("delta") or {}).get("content")) and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


def one(client, url: str, prompt: str, new_tokens: int, stream: bool) -> tuple[float, float, int]:
    """One greedy completion of `new_tokens` (the end of turn ignored by the server's settings)."""
    return timed(client, url, "/v1/completions", {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0}, stream)


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


def chat_one(client, url: str, prompt: str, max_tokens: int, stream: bool, model: str) -> tuple[float, float, int]:
    """One greedy chat completion."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    return timed(client, url, "/v1/chat/completions", body, stream)


PROMPTS = ["What is the capital of France?", "Give me three tips for sleeping well.", "Explain what a CPU does.",
           "Write a haiku about the sea.", "How do I boil an egg?", "What is 12 times 7?", "Name a famous painter.",
           "Why is the sky blue?"]


def chat_load(url: str, clients: int, requests_per_client: int, max_tokens: int, model: str) -> dict:
    """tokens/s, latency p99 (whole answers) and TTFT p50/p99 (a streamed pass) of `clients` concurrent clients."""
    def pass_of(stream: bool) -> tuple[list, float]:
        def client_loop(c: int) -> list:
            with httpx.Client() as client:
                return [chat_one(client, url, PROMPTS[(c + i) % len(PROMPTS)], max_tokens, stream, model)
                        for i in range(requests_per_client)]

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = [r for per_client in pool.map(client_loop, range(clients)) for r in per_client]
        return results, time.perf_counter() - start

    pass_of(False)  # warm-up round
    whole, wall = pass_of(False)
    streamed, _ = pass_of(True)
    latencies, ttfts = sorted(r[1] for r in whole), sorted(r[0] for r in streamed)
    pct = lambda xs, q: 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"tok_s": sum(r[2] for r in whole) / wall, "p99_ms": pct(latencies, 0.99), "ttft_p50_ms": pct(ttfts, 0.5),
            "ttft_p99_ms": pct(ttfts, 0.99), "tokens": sum(r[2] for r in whole)}


class InProcessEngine:
    """The ceiling: our engine (tasks/serve/engine.py, with the default settings) in this process, no HTTP, no
    server. `load` feeds it `clients` requests at a time, each finished one replaced by the next, as a client does."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tasks.serve.engine import engine_for
        from tasks.serve.loading import in_passing_thread
        from tasks.serve.settings import ServeSettings
        from tessera.core.generation import prompt_ids

        model = in_passing_thread(lambda: AutoModelForCausalLM.from_pretrained(model_dir).eval())
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.engine = engine_for(model, tokenizer, ServeSettings())
        self.prompts = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]

    def load(self, clients: int, requests_per_client: int, max_tokens: int) -> dict:
        import asyncio

        from tasks.serve.engine import Sampling

        greedy = Sampling(max_tokens, 0.0, 1.0, [])

        async def one(ids: list[int]) -> int:
            deadline = asyncio.get_running_loop().time() + 600
            deltas = [delta async for delta in self.engine.generate(ids, greedy, deadline, incremental=False)]
            return deltas[-1].completion_tokens

        async def client_loop(c: int) -> int:
            return sum([await one(self.prompts[(c + i) % len(self.prompts)]) for i in range(requests_per_client)])

        async def all_clients() -> int:
            return sum(await asyncio.gather(*(client_loop(c) for c in range(clients))))

        asyncio.run(all_clients())  # warm-up round
        start = time.perf_counter()
        tokens = asyncio.run(all_clients())
        return {"tok_s": tokens / (time.perf_counter() - start), "tokens": tokens}

    def close(self) -> None:
        self.engine.close()


def peer_comparison(args) -> None:
    import subprocess
    import sys

    home = Path(tempfile.mkdtemp(prefix="tessera-bench-peer-"))
    os.environ.update(TESSERA_HOME=str(home), HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", BENTOML_DO_NOT_TRACK="true")
    import mlflow

    from tasks.log_model import log_model_folder
    from tasks.serve import endpoints
    from tessera.core.processes import free_port, stop_tree
    from tessera.core.tracking import experiment_id, mlflow_client

    if args.model == "tiny":
        from tessera.core.tiny_model import build_tiny_chat

        model_dir = build_tiny_chat(home / "models" / "tiny-chat")
    else:
        from tessera.core.smollm2 import build_smollm2

        model_dir = build_smollm2(Path(os.environ.get("TESSERA_BENCH_MODELS", home / "models")) / "smollm2-135m-instruct")
    with mlflow.start_run(experiment_id=experiment_id(mlflow_client(), "/bench/serve")):
        log_model_folder(model_dir, "llm/v1/chat", "bench.serve.peer")
    uri = "models:/bench.serve.peer/1"

    # both servers up at once, measured in alternating order round after round: this VM's speed drifts by +-15%
    # within an hour, more than the differences measured, so one server's figures must not all come from one hour
    endpoints.serve(uri, name="bench", port=free_port())
    port, peer, ceiling, rounds = free_port(), None, None, {}
    try:
        peer = subprocess.Popen([str(Path(sys.executable).with_name("transformers")), "serve", "--continuous-batching",
                                 "--host", "127.0.0.1", "--port", str(port), str(model_dir)],
                                stdout=open(home / "peer.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        servers = {"ours": (endpoints.get("bench").url, uri), "peer": (f"http://127.0.0.1:{port}", str(model_dir))}
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{servers['peer'][0]}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if peer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start: {(home / 'peer.log').read_text()[-2000:]}")
            time.sleep(1)
        ceiling = InProcessEngine(model_dir)
        for r in range(args.rounds):
            for clients in CLIENTS:
                for who in ("ours", "peer", "ceiling") if r % 2 == 0 else ("ceiling", "peer", "ours"):
                    if who == "ceiling":
                        measured = ceiling.load(clients, args.requests_per_client, args.new_tokens)
                    else:
                        url, model = servers[who]
                        measured = chat_load(url, clients, args.requests_per_client, args.new_tokens, model)
                    rounds.setdefault((who, clients), []).append(measured)
            print(f"round {r + 1}: ours/peer@16={rounds['ours', 16][-1]['tok_s'] / rounds['peer', 16][-1]['tok_s']:.2f} "
                  f"ours/ceiling@16={rounds['ours', 16][-1]['tok_s'] / rounds['ceiling', 16][-1]['tok_s']:.2f}", flush=True)
    finally:
        if ceiling is not None:
            ceiling.close()
        endpoints.stop("bench")
        if peer is not None:
            stop_tree(peer.pid, grace=10, popen=peer)
    results = {key: {field: statistics.median(r[field] for r in runs) for field in runs[0]} for key, runs in rounds.items()}

    print(f"{'server':>8} {'clients':>7} {'tok/s':>8} {'p99 ms':>8} {'ttft p50':>9} {'ttft p99':>9} {'tokens':>7}")
    for who in ("ours", "peer", "ceiling"):
        for clients in CLIENTS:
            r = results[who, clients]
            print(f"{who:>8} {clients:>7} {r['tok_s']:8.1f} {r.get('p99_ms', float('nan')):8.0f} {r.get('ttft_p50_ms', float('nan')):9.0f} "
                  f"{r.get('ttft_p99_ms', float('nan')):9.0f} {int(r['tokens']):7}")
    ours = results["ours", 16]
    print(f"serve ours/peer@16={ours['tok_s'] / results['peer', 16]['tok_s']:.2f} "
          f"ours/ceiling@16={ours['tok_s'] / results['ceiling', 16]['tok_s']:.2f} ttft_p50_ms={ours['ttft_p50_ms']:.0f} "
          f"peer_ttft_p50_ms={results['peer', 16]['ttft_p50_ms']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--peer", action="store_true", help="ours against transformers serve --continuous-batching and the in-process ceiling")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2", help="with --peer: the model served")
    parser.add_argument("--rounds", type=int, default=2, help="with --peer: rounds of both servers, in alternating order (medians)")
    args = parser.parse_args()
    if args.peer:
        return peer_comparison(args)

    home = Path(tempfile.mkdtemp(prefix="tessera-bench-serve-"))
    os.environ.update(TESSERA_HOME=str(home), HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", BENTOML_DO_NOT_TRACK="true")
    import mlflow

    from tasks.log_model import log_model_folder
    from tasks.serve.model_server import start_endpoint
    from tasks.serve.settings import ServeSettings
    from tessera.core.tiny_model import build_tiny_chat
    from tessera.core.tracking import experiment_id, mlflow_client

    model_dir = build_tiny_chat(home / "models" / "tiny-chat")
    with mlflow.start_run(experiment_id=experiment_id(mlflow_client(), "/bench/serve")):
        log_model_folder(model_dir, "llm/v1/chat", "bench.serve.tiny")

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
