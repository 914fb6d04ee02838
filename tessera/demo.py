"""`tessera demo`: the whole pipeline on embedded defaults, ending with one question over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from typing import NamedTuple

from tessera.core.errors import ConfigError
from tessera.core.paths import ASSETS_DIR, mlflow_tracking_uri, resolve_data_path, tessera_home

DEMO_DATA = "dbfs:/Volumes/main/default/demo/chat.jsonl"


class Demo(NamedTuple):
    """How the demo trains one model until it answers the first conversation word for word."""

    register_to: str
    duration: str  # epochs: how often the model sees each of the 8 conversations
    learning_rate: float | None  # None: the catalog's
    about: str


DEMOS = {
    "tessera/tiny-chat": Demo("main.demo.tiny_chat", "150ep", None, "a toy model, trained from random weights"),
    # Measured on 2 CPU cores: at 1e-4, 10 epochs already match (final loss 0.04) and 15 leave a margin (0.001).
    # 1e-4 is twice the catalog's rate, which suits real data sets; here the model learns 8 answers by heart.
    "tessera/smollm2-135m-instruct": Demo(
        "main.demo.smollm2", "15ep", 1e-4,
        "a real pretrained model (converted from GGUF on first use, ~35 s), 15 epochs: ~15 min on 2 CPU cores",
    ),
}


def ask(url: str, messages: list[dict]) -> str:
    body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": 64})
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def run_demo(model: str = "tessera/tiny-chat") -> int:
    from tessera import sdk
    from tasks.serve.model_server import start_endpoint

    if model not in DEMOS:
        raise ConfigError(f"tessera demo --model {model}: the demo runs on {' or '.join(DEMOS)}")
    demo = DEMOS[model]
    source = ASSETS_DIR / "demo_chat.jsonl"
    target = resolve_data_path(DEMO_DATA)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    print(f"1. demo data: 8 conversations in {DEMO_DATA}\n   ({target})")

    print(f"2. fine-tuning {model}: {demo.about}", flush=True)
    run = sdk.create(
        model=model, train_data_path=DEMO_DATA, register_to=demo.register_to, training_duration=demo.duration,
        learning_rate=demo.learning_rate,
    )
    print(f"   run {run.name}, a Prefect flow in the background", flush=True)
    if sdk.print_until_done(run.name) != 0:
        return 1
    model_uri = sdk.get(run.name).registered_model_version

    print(f"3. serving {model_uri} with BentoML on 127.0.0.1", flush=True)
    log_file = tessera_home() / "runs" / run.name / "endpoint.log"
    conversation = json.loads(source.read_text().splitlines()[0])["messages"]
    prompt, expected = conversation[:-1], conversation[-1]["content"]
    with start_endpoint(model_uri, log_file=log_file) as endpoint:
        answer = ask(endpoint.url, prompt)
    for m in prompt:
        print(f"   {m['role']}: {m['content']}")
    print(f"   assistant (served): {answer}")
    matched = answer.strip() == expected.strip()
    print(f"   {'matches' if matched else 'DOES NOT match'} the trained answer: {expected}")

    print(
        "\nWhere to look next:\n"
        f"  {os.environ['PREFECT_API_URL'].removesuffix('/api')}   (the Prefect UI: this run's flow and its DAG of tasks;"
        " tessera server status|stop)\n"
        f"  mlflow ui --backend-store-uri {mlflow_tracking_uri()}   (the run's loss curve, the registered model)\n"
        f"  registered model: {model_uri}\n"
        f"  tessera serve {model_uri}   (then POST /v1/chat/completions on 127.0.0.1:3000)\n"
        f"  tessera runs get {run.name}"
    )
    return 0 if matched else 1
