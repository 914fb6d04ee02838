"""The endpoint as applications see it: a real BentoML server on 127.0.0.1 over a registered model, called with the
`openai` client and with raw HTTP. One server with default settings and one with tight limits, shared by the module."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.parse
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import write_jsonl

pytestmark = pytest.mark.slow

CHAT_MODEL = "main.serve.chat"
QUESTION = [{"role": "user", "content": "hello there"}]


def register(model_dir: Path, name: str, task: str) -> str:
    """A model directory registered as the register stage does, without training."""
    import mlflow

    from tasks.log_model import log_model_folder
    from tessera.core.tracking import experiment_id, mlflow_client

    with mlflow.start_run(experiment_id=experiment_id(mlflow_client(), "/tests/serve")):
        info = log_model_folder(model_dir, task, name)
    return f"models:/{name}/{info.registered_model_version}"


@contextmanager
def environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def with_context(model_dir: Path, out: Path, positions: int) -> Path:
    """A copy of a model that takes `positions` tokens: answers long enough (seconds) that a sequence left running
    shows. The tiny model's rotary positions need no new weights."""
    import shutil

    shutil.copytree(model_dir, out)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        data = json.loads((out / name).read_text())
        (out / name).write_text(json.dumps(data | {key: positions}))
    return out


@pytest.fixture(scope="module")
def chat_uri(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("serve-home")
    (home / "models").mkdir()
    (home / "models" / "tiny-chat").symlink_to(tiny_model_dir)
    with environment(TESSERA_HOME=str(home), PREFECT_HOME=str(home / "prefect")):
        yield register(with_context(tiny_model_dir, home / "long-chat", 8192), CHAT_MODEL, "llm/v1/chat")


@pytest.fixture(scope="module")
def url(chat_uri, tmp_path_factory):
    """An endpoint with the default settings."""
    from tasks.serve.model_server import start_endpoint

    with start_endpoint(chat_uri, log_file=tmp_path_factory.mktemp("logs") / "endpoint.log") as endpoint:
        yield endpoint.url


@pytest.fixture(scope="module")
def tight_url(chat_uri, tmp_path_factory):
    """An endpoint behind an API key, with room for 2 sequences, a 3 s generation limit and 4 kB bodies. Its answers
    run to max_tokens (no end of turn), so a long one surely passes the limit, and a 1-token one (10 ms here) surely
    does not, even on a loaded machine (a 0.5 s limit once did not hold on CI)."""
    from tasks.serve.model_server import start_endpoint

    limits = {"TESSERA_SERVE_MAX_PENDING": "2", "TESSERA_SERVE_REQUEST_TIMEOUT_S": "3", "TESSERA_SERVE_MAX_BODY_BYTES": "4096",
              "TESSERA_SERVE_IGNORE_EOS": "true"}
    with environment(**limits):
        endpoint = start_endpoint(chat_uri, api_key="s3cret", log_file=tmp_path_factory.mktemp("logs") / "tight.log")
    with endpoint:
        post(endpoint.url, {"messages": QUESTION, "max_tokens": 1}, key="s3cret")  # the first step is slow: not in the limit
        yield endpoint.url


def post(url: str, body, path: str = "/v1/chat/completions", content_type: str = "application/json", key: str | None = None):
    """(status, parsed JSON body) of a raw POST; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers=headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def client(url: str, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_the_openai_client_chats_completes_and_streams_the_same_text(url):
    openai = client(url)
    whole = openai.chat.completions.create(model="bot", messages=QUESTION, temperature=0, max_tokens=12)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens > 0 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(openai.chat.completions.create(
        model="bot", messages=QUESTION, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    text = openai.completions.create(model="bot", prompt="hello", temperature=0, max_tokens=10)
    assert text.object == "text_completion" and text.usage.completion_tokens == 10
    streamed = list(openai.completions.create(model="bot", prompt="hello", temperature=0, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert [m.id for m in openai.models.list().data] == ["models:/main.serve.chat/1"]


def test_n_choices_and_stop_strings_behave_as_openai(url):
    openai = client(url)
    two = openai.chat.completions.create(model="bot", messages=QUESTION, temperature=0, max_tokens=16, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == two.choices[1].message.content  # greedy: the same answer twice
    assert two.usage.completion_tokens == 32

    sampled = openai.completions.create(model="bot", prompt="hello", temperature=1.5, top_p=1.0, max_tokens=24, n=4)
    assert len(sampled.choices) == 4 and len({c.text for c in sampled.choices}) > 1  # sampling per choice

    text = openai.completions.create(model="bot", prompt="hello", temperature=0, max_tokens=24).choices[0].text
    stop = text[1:4]  # somewhere in the answer: it ends right before the first place it occurs
    assert len(stop) == 3
    cut = openai.completions.create(model="bot", prompt="hello", temperature=0, max_tokens=24, stop=[stop, "never-seen"])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(openai.completions.create(model="bot", prompt="hello", temperature=0, max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


BAD_REQUESTS = [  # (body, content type, status, the param the error names)
    (b"{not json", "application/json", 400, None),
    (b"[1, 2]", "application/json", 400, None),
    ({"model": "bot"}, "application/json", 400, "messages"),
    ({"messages": []}, "application/json", 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "application/json", 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 42}]}, "application/json", 400, "messages.0.content"),
    ({"messages": QUESTION, "max_tokens": 0}, "application/json", 400, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 1_000_000_000}, "application/json", 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hello " * 9000}]}, "application/json", 400, "messages"),
    ({"messages": QUESTION, "temperature": 3}, "application/json", 400, "temperature"),
    ({"messages": QUESTION, "top_p": 0}, "application/json", 400, "top_p"),
    ({"messages": QUESTION, "seed": 7}, "application/json", 400, "seed"),
    ({"messages": QUESTION, "presence_penalty": 0.5}, "application/json", 400, "presence_penalty"),
    ({"messages": QUESTION, "logprobs": True}, "application/json", 400, "logprobs"),
    ({"messages": QUESTION, "n": 99}, "application/json", 400, "n"),
    ({"messages": QUESTION, "frobnicate": 1}, "application/json", 400, "frobnicate"),
    ({"messages": QUESTION}, "text/plain", 415, None),
    (b'{"messages": "' + b"x" * 12_000_000 + b'"}', "application/json", 413, None),
]


def test_bad_requests_get_a_4xx_in_openais_shape_and_the_server_keeps_serving(url):
    for body, content_type, status, param in BAD_REQUESTS:
        got, answer = post(url, body, content_type=content_type)
        assert got == status, (body if isinstance(body, dict) else body[:40], answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, (param, error)
    assert post(url, {"prompt": ""}, "/v1/completions")[0] == 400
    got, answer = post(url, {"messages": QUESTION, "max_tokens": 2, "user": "u-1", "presence_penalty": 0, "frequency_penalty": 0})
    assert got == 200 and answer["usage"]["completion_tokens"] == 2  # fields clients send by habit are accepted


def test_16_clients_each_get_their_own_answer(url):
    """Concurrent requests are batched together; each client still gets the answer to its own prompt: the greedy
    answers to distinct prompts, as generated one at a time."""
    words = "what is two and four it question answer".split()
    prompts = [f"{words[i % 8]} {words[i * 3 % 8]} {words[i // 8]}" for i in range(32)]

    def ask(prompt: str) -> str:
        got, answer = post(url, {"prompt": prompt, "max_tokens": 8, "temperature": 0}, "/v1/completions")
        assert got == 200, answer
        return answer["choices"][0]["text"]

    alone = {prompt: ask(prompt) for prompt in prompts}
    assert len(set(alone.values())) > len(prompts) // 2  # distinct enough that a mixed-up answer shows
    asked = prompts * 8
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, asked))
    wrong = [(prompt, answer) for prompt, answer in zip(asked, answers) if answer != alone[prompt]]
    assert wrong == [], f"{len(wrong)} of {len(asked)} answers differ from the prompt's own, e.g. {wrong[:3]}"


def engine_state(url: str) -> dict:
    """The requests being answered and the sequences the engine is generating, from the server's stats route."""
    with urllib.request.urlopen(url + "/_tessera/engine", timeout=10) as r:
        return json.loads(r.read())


def idle_within(url: str, seconds: float = 1.0) -> dict:
    """The server's state once nothing is in progress, or as it is after `seconds`."""
    deadline = time.monotonic() + seconds
    while (state := engine_state(url)) != {"requests": 0, "sequences": 0} and time.monotonic() < deadline:
        time.sleep(0.05)
    return state


def hang_up_during(url: str, body: dict) -> None:
    """Send a non-streamed completion request and close the connection once the engine is generating it."""
    data = json.dumps(body).encode()
    at = urllib.parse.urlsplit(url)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {at.netloc}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    with socket.create_connection((at.hostname, at.port)) as conn:
        conn.sendall(head.encode() + data)
        deadline = time.monotonic() + 30
        while engine_state(url)["sequences"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)


def test_sequences_nobody_reads_end_within_a_second(url):
    long = {"prompt": "hello", "temperature": 0, "max_tokens": 1500}  # seconds of work, were it all generated
    start = post(url, long | {"max_tokens": 24}, "/v1/completions")[1]["choices"][0]["text"]

    # an answer that ends on a stop string: the engine stops generating it
    got, cut = post(url, long | {"stop": start[1:4]}, "/v1/completions")
    assert got == 200 and cut["choices"][0]["finish_reason"] == "stop", cut
    after = {"a stop string": idle_within(url)}
    # a client that hangs up before its whole answer is ready, with or without a stop string to look for
    hang_up_during(url, long)
    after["a hang-up"] = idle_within(url)
    hang_up_during(url, long | {"stop": "never-seen"})
    after["a hang-up with a stop string"] = idle_within(url)
    assert after == dict.fromkeys(after, {"requests": 0, "sequences": 0})
    assert post(url, {"prompt": "hello", "max_tokens": 2}, "/v1/completions")[0] == 200


def test_an_api_key_a_full_queue_and_the_time_limit(tight_url):
    assert post(tight_url, {"messages": QUESTION, "max_tokens": 1})[0] == 401
    got, answer = post(tight_url, {"messages": QUESTION, "max_tokens": 1}, key="wrong")
    assert got == 401 and answer["error"]["code"] == "invalid_api_key"
    assert post(tight_url, {"messages": QUESTION, "max_tokens": 1}, key="s3cret")[0] == 200
    # a key with a character outside ASCII is a wrong key like any other, and the server does not notice it
    got, answer = post(tight_url, {"messages": QUESTION, "max_tokens": 1}, key="s3crét")
    assert got == 401 and answer["error"]["code"] == "invalid_api_key", answer
    assert post(tight_url, {"messages": QUESTION, "max_tokens": 1}, key="s3cret")[0] == 200
    assert post(tight_url, {"messages": QUESTION, "stop": "x" * 5000}, key="s3cret")[0] == 413

    # two sequences fill it: a third request is turned away while they run
    with urllib.request.urlopen(urllib.request.Request(
        tight_url + "/v1/chat/completions", headers={"Content-Type": "application/json", "Authorization": "Bearer s3cret"},
        data=json.dumps({"messages": QUESTION, "n": 2, "max_tokens": 8000, "stream": True}).encode(),
    )) as stream:  # 8000 tokens: well past the limit (1400 once finished inside 3 s with the current engine)
        stream.readline()  # the role chunk: both sequences are admitted
        got, answer = post(tight_url, {"messages": QUESTION, "max_tokens": 1}, key="s3cret")
        assert got == 429 and answer["error"]["type"] == "rate_limit_error"
        events = [line for line in stream.read().decode().splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "timeout"  # streamed past the limit
    assert events[-1] == "data: [DONE]"

    # a sequence that runs past the limit is a 504
    got, answer = post(tight_url, {"messages": QUESTION, "max_tokens": 8000}, key="s3cret")
    assert got == 504 and answer["error"]["type"] == "timeout_error", answer
    assert post(tight_url, {"messages": QUESTION, "max_tokens": 1}, key="s3cret")[0] == 200  # still serving


def test_instruction_model_answers_on_completions_as_the_trainer_did(home):
    """Train/serve agreement: the endpoint's greedy answers to a run's eval prompts are the trainer's final
    eval-prompt generations (made from the saved weights)."""

    from tessera import foundation_model as fm
    from tasks.serve.model_server import start_endpoint
    from tessera.core.tracking import mlflow_client as tracking_client

    pairs = [("Q: two and two?\nA:", " four"), ("Q: sky colour?\nA:", " blue"), ("Q: say hi\nA:", " hi there")]
    data = write_jsonl(home / "instructions.jsonl", [{"prompt": p, "response": r} for p, r in pairs])
    run = fm.create(
        model="tessera/tiny-chat", task_type="INSTRUCTION_FINETUNE", train_data_path=str(data),
        eval_prompts=[p for p, _ in pairs], register_to="main.serve.answers", training_duration="40ba", learning_rate=3e-3,
    )
    run = _wait(run.name)
    assert run.status.value == "COMPLETED", run.details
    mlflow = tracking_client()
    table = json.loads(Path(mlflow.download_artifacts(run.run_id, "eval_prompts.json")).read_text())
    trained = [row for row in (dict(zip(table["columns"], r)) for r in table["data"]) if row["step"] == 40]
    assert len(trained) == len(pairs)

    with start_endpoint(run.registered_model_version, log_file=home / "endpoint.log") as endpoint:
        openai = client(endpoint.url)
        for generation in trained:
            served = openai.completions.create(model="answers", prompt=generation["prompt"], temperature=0, max_tokens=32)
            assert (served.choices[0].text, served.choices[0].finish_reason) == (generation["response"], generation["finish_reason"])
        got, answer = post(endpoint.url, {"messages": QUESTION})
        assert got == 400 and "/v1/completions" in answer["error"]["message"]  # never wrapped in a chat template


def _wait(name: str, timeout: float = 420):
    from tessera import foundation_model as fm

    deadline = time.time() + timeout
    while not (run := fm.get(name)).status.finished:
        assert time.time() < deadline, f"run {name} did not finish"
        time.sleep(1)
    return run


def test_the_real_model_is_served(real_model_home, real_model_dir):
    from tasks.serve.model_server import start_endpoint

    uri = register(real_model_dir, "main.serve.smollm2", "llm/v1/chat")
    with start_endpoint(uri, log_file=real_model_home / "endpoint.log") as endpoint:
        reply = client(endpoint.url).chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=24,
        )
    assert "Paris" in reply.choices[0].message.content


