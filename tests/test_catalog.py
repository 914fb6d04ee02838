import json
import logging
import os
import subprocess
import sys

import pytest

from tessera.catalog import catalog, resolve_model
from tessera.errors import TesseraError

MANAGED_SERVICE_MODELS = {
    32768: ["databricks/dbrx-base", "databricks/dbrx-instruct", "mistralai/Mistral-7B-v0.1",
            "mistralai/Mistral-7B-Instruct-v0.2", "mistralai/Mixtral-8x7B-v0.1"],
    131072: [f"meta-llama/Llama-3.2-{s}" for s in ("1B", "1B-Instruct", "3B", "3B-Instruct")]
    + [f"meta-llama/Meta-Llama-3.1-{s}" for s in ("8B", "8B-Instruct", "70B", "70B-Instruct", "405B", "405B-Instruct")],
    8192: [f"meta-llama/Meta-Llama-3-{s}" for s in ("8B", "8B-Instruct", "70B", "70B-Instruct")],
    4096: [f"meta-llama/Llama-2-{s}" for s in ("7b-hf", "13b-hf", "70b-hf", "7b-chat-hf", "13b-chat-hf", "70b-chat-hf")],
    16384: [f"codellama/CodeLlama-{n}-{v}" for n in ("7b", "13b", "34b") for v in ("hf", "Instruct-hf", "Python-hf")],
}


def test_every_managed_service_model_is_listed_with_its_context_length():
    models = catalog()
    for length, names in MANAGED_SERVICE_MODELS.items():
        for name in names:
            assert models[name].context_length == length, name
    retired = {n for n, m in models.items() if m.retired}
    assert retired == set(MANAGED_SERVICE_MODELS[8192] + MANAGED_SERVICE_MODELS[4096] + MANAGED_SERVICE_MODELS[16384])
    assert all(str(models[n].retired) == "2024-12-13" and models[models[n].replacement].retired is None for n in retired)


def test_a_retired_model_still_resolves_with_a_warning_naming_its_replacement(caplog):
    with caplog.at_level(logging.WARNING):
        model = resolve_model("meta-llama/Llama-2-7b-hf")
    assert model.context_length == 4096
    assert "retired" in model.warnings[0] and "meta-llama/Meta-Llama-3.1-8B" in model.warnings[0]


def test_context_length_above_the_maximum_is_refused():
    assert resolve_model("meta-llama/Meta-Llama-3.1-8B", context_length=8192).context_length == 8192
    with pytest.raises(TesseraError, match="above meta-llama/Meta-Llama-3-8B's maximum of 8192"):
        resolve_model("meta-llama/Meta-Llama-3-8B", context_length=8193)


def test_a_local_model_directory_outside_the_catalog_is_accepted_with_a_warning(home, tiny_model_dir):
    model = resolve_model(str(tiny_model_dir))
    assert model.context_length == json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    assert "not in the model catalog" in model.warnings[0]


def test_an_unknown_model_offline_is_a_clear_error(home):
    with pytest.raises(TesseraError, match="not in the catalog, not a local directory"):
        resolve_model("someone/does-not-exist")


def test_tiny_chat_is_built_on_first_use_and_is_small(home, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "fresh"))
    model = resolve_model("tessera/tiny-chat")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(model.path)
    assert net.config.model_type == "llama"
    assert sum(p.numel() for p in net.parameters()) < 5_000_000
    assert AutoTokenizer.from_pretrained(model.path).chat_template
    assert resolve_model("tessera/tiny-chat").path == model.path  # reused, not rebuilt


def test_cli_models_lists_the_catalog_without_heavy_imports():
    result = subprocess.run([sys.executable, "-m", "tessera.cli", "models", "--json"], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0
    names = {m["name"] for m in json.loads(result.stdout)}
    assert "meta-llama/Meta-Llama-3.1-405B-Instruct" in names and "tessera/tiny-chat" in names
    probe = "import sys, tessera.cli; tessera.cli.build_parser(); print(sorted(m for m in ('torch', 'prefect', 'mlflow', 'pyspark', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
