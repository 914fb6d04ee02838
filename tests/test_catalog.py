import json
import logging
import os
import subprocess
import sys

import pytest

from tessera.core.catalog import catalog, resolve_model
from tessera.core.errors import TesseraError

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


# Published parameter counts, by the part of the name that says the size (first match wins)
NOMINAL_PARAMETERS = {
    "dbrx": 132e9, "Mixtral-8x7B": 46.7e9, "Mistral-7B": 7.24e9, "Llama-3.2-1B": 1.24e9, "Llama-3.2-3B": 3.21e9,
    "-8B": 8.03e9, "-70B": 70.6e9, "-405B": 405.9e9, "-7b": 6.74e9, "-13b": 13.0e9, "-34b": 33.7e9, "-70b": 69.0e9,
    "smollm2-135m": 134.5e6, "tiny-chat": 0.91e6,
}


def test_every_catalog_entry_has_an_architecture_of_its_nominal_size():
    for name, spec in catalog().items():
        nominal = next(n for key, n in NOMINAL_PARAMETERS.items() if key in name)
        assert spec.architecture is not None, name
        assert spec.architecture.parameters == pytest.approx(nominal, rel=0.03), name


def test_resolved_models_carry_their_architecture(home, tiny_model_dir):
    assert resolve_model("meta-llama/Meta-Llama-3.1-8B").architecture == catalog()["meta-llama/Meta-Llama-3.1-8B"].architecture
    from_config = resolve_model("tessera/tiny-chat").architecture  # read from the built model's config.json
    assert_same_shape(from_config, catalog()["tessera/tiny-chat"].architecture)
    assert_same_shape(resolve_model(str(tiny_model_dir)).architecture, from_config)


def assert_same_shape(actual, expected):
    """Equal architectures; a config.json states head_dim even where it is hidden_size / heads, the catalog does not."""
    assert actual.model_dump(exclude={"head_dim"}) == expected.model_dump(exclude={"head_dim"})
    assert actual.dims_per_head == expected.dims_per_head


@pytest.mark.slow
def test_the_real_model_resolves_to_its_converted_directory_with_its_catalog_settings(real_model_home):
    model = resolve_model("tessera/smollm2-135m-instruct")
    spec = catalog()["tessera/smollm2-135m-instruct"]
    assert model.path == str(real_model_home / "models" / "smollm2-135m-instruct")
    assert model.max_context_length == 8192 and model.learning_rate == spec.learning_rate
    assert_same_shape(model.architecture, spec.architecture)  # read from its config.json
    assert model.architecture.parameters == 134_515_008
