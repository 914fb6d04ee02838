"""Shared test set-up: offline, telemetry off, a fresh TESSERA_HOME per test, the tiny model built once."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from tessera.core.smollm2 import wheel_cache

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[key] = value
# One torch thread per test process and per process it starts (unless set): `make test` runs two test processes on
# two cores, and torch's default of one thread per core had them spinning (OpenMP) on cores the other one needed,
# so the suite took 44% more CPU time in all (13.3 min instead of 8.8)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)  # the session's own server instead (pytest_configure)
# The SmolLM2 wheel `make real-model` fetched into the user's TESSERA_HOME, pinned before any test moves TESSERA_HOME:
# real_model_dir converts it on first use, and the first test to ask for it may run inside another home (a module's
# serving home, say), where the wheel is not
os.environ.setdefault("TESSERA_WHEEL_CACHE", str(wheel_cache()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tessera.core.tiny_model import build_tiny_chat

    return build_tiny_chat(tmp_path_factory.mktemp("models") / "tiny-chat")


def pytest_configure(config):
    """One embedded Prefect server for the whole session, as a user's TESSERA_HOME has one for all its runs
    (tessera.core.prefect_server): every test's runs are recorded there, through PREFECT_API_URL, set here before
    any test module imports Prefect (which reads its settings once per process). It starts while pytest collects
    the tests; the first test waits for it (prefect_server_ready)."""
    import tempfile

    from tessera.core import prefect_server

    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller (make test): its test processes each start their own
    # one fork server for the session's training workers too (tessera.core.forkserver), where a user's home has one
    # for all its runs: each test's home would otherwise start its own
    config.forkserver_dir = tempfile.mkdtemp(prefix="tessera-test-workers-")
    os.environ["TESSERA_FORKSERVER_DIR"] = config.forkserver_dir
    config.prefect_home = tempfile.mkdtemp(prefix="tessera-test-prefect-")
    with _tessera_home(config.prefect_home):
        config.prefect_server = prefect_server.spawn()
    os.environ["PREFECT_API_URL"] = config.prefect_server[1]


# Test files in the order of their running times, longest first (tests/durations.json, seconds per file from a whole
# run), with --no-loadscope-reorder (make test): the two test processes take files in this order, so a long file is
# never the last one left while the other process idles. A file not in the list counts as the longest (it runs early).
# `TESSERA_TEST_DURATIONS=tests/durations.json make test` writes the list anew from that run.
DURATIONS = Path(__file__).with_name("durations.json")
_file_seconds: dict[str, float] = {}  # with TESSERA_TEST_DURATIONS: seconds per file of this run


def pytest_collection_modifyitems(config, items):
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], float("inf")))  # stable: in-file order kept


def pytest_runtest_logreport(report):
    if os.environ.get("TESSERA_TEST_DURATIONS"):
        path = report.nodeid.split("::")[0]
        _file_seconds[path] = _file_seconds.get(path, 0.0) + report.duration


def pytest_sessionfinish(session):
    out = os.environ.get("TESSERA_TEST_DURATIONS")
    if out and not hasattr(session.config, "workerinput") and _file_seconds:  # the controller: it hears every report
        ordered = dict(sorted(((path, round(s, 1)) for path, s in _file_seconds.items()), key=lambda kv: -kv[1]))
        Path(out).write_text(json.dumps(ordered, indent=1) + "\n")


@pytest.fixture(scope="session", autouse=True)
def prefect_server_ready(pytestconfig):
    from tessera.core import prefect_server

    with _tessera_home(pytestconfig.prefect_home):
        prefect_server.wait_ready(*pytestconfig.prefect_server)


def pytest_unconfigure(config):
    import shutil

    from tessera.core import forkserver
    from tessera.core.processes import stop_tree

    if getattr(config, "forkserver_dir", None):
        forkserver.stop_all()
        shutil.rmtree(config.forkserver_dir, ignore_errors=True)
    if getattr(config, "prefect_home", None):
        process = config.prefect_server[0]
        stop_tree(process.pid, grace=10, popen=process)
        shutil.rmtree(config.prefect_home, ignore_errors=True)


@contextmanager
def _tessera_home(path: str):
    os.environ["TESSERA_HOME"] = path
    try:
        yield
    finally:
        del os.environ["TESSERA_HOME"]


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> Path:
    """An empty embedded MLflow store (tessera.core.tracking's SQLite database), created once: each test's home
    starts with a copy, so the run that first touches it opens it instead of creating all its tables (~1.5 s)."""
    import subprocess
    import sys

    template = tmp_path_factory.mktemp("mlflow-template")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # a module's own store, set by MLflow
    subprocess.run([sys.executable, "-c", "from tessera.core.tracking import mlflow_client; mlflow_client()"],
                   check=True, env={**env, "TESSERA_HOME": str(template)}, capture_output=True)
    return template / "mlflow" / "mlflow.db"


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_model_dir, mlflow_store) -> Path:
    """A fresh TESSERA_HOME with the session's tiny model and an empty MLflow store already in it, and a fresh
    PREFECT_HOME in it (its runs are recorded by the session's Prefect server)."""
    import shutil

    home = tmp_path / "tessera-home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny-chat").symlink_to(tiny_model_dir)
    (home / "mlflow").mkdir()
    shutil.copy(mlflow_store, home / "mlflow" / "mlflow.db")
    (home / "prefect").mkdir()
    monkeypatch.setenv("TESSERA_HOME", str(home))
    monkeypatch.setenv("PREFECT_HOME", str(home / "prefect"))
    monkeypatch.delenv("TESSERA_VOLUMES_ROOT", raising=False)
    # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ, which reads as the user's own server:
    # without this, every test after the first would use the first test's store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def real_model_dir(request) -> Path:
    """SmolLM2-135M-Instruct converted from the wheel `make real-model` fetched (`make test` does), once for all
    sessions: the conversion takes ~35 s, so it is kept in pytest's cache (.pytest_cache; --cache-clear redoes it)."""
    from tessera.core.smollm2 import build_smollm2

    return build_smollm2(request.config.cache.mkdir("tessera-models") / "smollm2-135m-instruct")


@pytest.fixture
def real_model_home(home, real_model_dir) -> Path:
    """`home` with the converted SmolLM2 in it too, so resolve_model finds it instead of converting it again."""
    (home / "models" / "smollm2-135m-instruct").symlink_to(real_model_dir)
    return home


EOT, EOS = "<|end_of_turn|>", "<|endoftext|>"
EOT_TEMPLATE = (  # a newline after the end-of-turn token, as many templates have: it must not be trained
    "{% for m in messages %}{{ '<|start|>' + m['role'] + '\n' + m['content'] + '<|end_of_turn|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def eot_model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer whose chat template ends a turn with `<|end_of_turn|>`, which is not its EOS
    (built as tessera.core.tiny_model builds tiny-chat, with that other template)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOS, "<|start|>", EOT, "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(["user assistant question answer what is two and two it is four"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token="<|pad|>", chat_template=EOT_TEMPLATE)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("models") / "eot-chat"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, records: list) -> Path:
    """Records as JSONL; a str entry is written as a raw line (for malformed-input tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat(*turns: str, system: str | None = None) -> dict:
    """chat('q', 'a', 'q2', 'a2') -> a valid messages record (user/assistant alternating)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server on 127.0.0.1, once per session: a SQLite backend and artifacts proxied through
    it (`--serve-artifacts`, `--artifacts-destination`), so clients reach its artifact store only over HTTP. Yields
    its URL; tests point MLFLOW_TRACKING_URI at it (monkeypatch.setenv)."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: its workers stop with it
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runner: 7 idle huey processes
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
