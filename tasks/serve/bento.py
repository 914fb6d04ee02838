"""A Bento of the serving service with one registered model version inside it, built offline.

`build_bento("models:/name/3")` imports that MLflow model version into the BentoML model store
(`bentoml.mlflow.import_model`), stages a build context (the `tasks/` and `tessera/` sources, a bentofile and a
manifest naming the model), and runs `bentoml build` without the network (`lock_packages: false`: the Python
packages are pinned from the versions installed here instead). BentoML's stores live in BENTOML_HOME, which is
`$TESSERA_HOME/bentoml`. Inside the Bento, `tasks/serve/loading.py` finds the manifest and loads the model from the
Bento's model store, not from the registry.

    python -m tasks.serve.bento models:/main.default.chat/1
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from tessera.core import registry
from tessera.core.errors import TesseraError
from tessera.core.paths import apply_engine_defaults, tessera_home

SERVICE = "tasks.serve.service:ChatService"
MANIFEST = "tessera_bento.json"  # at the root of the Bento's sources; tasks/serve/loading.py reads it
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # holds tasks/ and tessera/
SOURCES = ("tasks", "tessera")
# What the service imports, directly or through MLflow's transformers flavor; pinned to the installed versions.
# opentelemetry-sdk is pinned too: unpinned, pip backtracks bentoml to ancient releases (STACK.md).
PACKAGES = (
    "bentoml", "mlflow", "torch", "transformers", "tokenizers", "accelerate", "safetensors", "jinja2",
    "fastapi", "pydantic", "pandas", "opentelemetry-sdk",
)
BENTO_ENVS = {  # set in the image (a Dockerfile ENV); the model is inside, so nothing needs the Hub or telemetry
    "BENTOML_DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
_TAG_PART = re.compile(r"[^a-z0-9._-]+")


def bentoml_home() -> Path:
    return tessera_home() / "bentoml"


def tag_part(text: str) -> str:
    """`text` as a BentoML tag name or version: lowercase alphanumerics, `-`, `_`, `.`, alphanumeric at both ends,
    at most 63 characters."""
    part = _TAG_PART.sub("-", text.lower()).strip("-_.")[:63].rstrip("-_.")
    if not part:
        raise TesseraError(f"{text!r} cannot be made into a BentoML tag")
    return part


def pinned_packages() -> list[str]:
    """`name==version` as installed, without a local label (torch's `+cpu` is on no index that pip uses by default:
    the image gets PyPI's torch of that version, built for CUDA, which runs on CPU as well)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in PACKAGES]


def import_registered(model_uri: str):
    """The registered version in BentoML's model store as `<name>:<version>` (imported once; a later build of the
    same version reuses it). Returns (bentoml.Model, canonical models:/name/N URI, task)."""
    import bentoml
    import mlflow
    from bentoml.exceptions import NotFound

    mv = registry.resolve(model_uri)
    canonical = f"models:/{mv.name}/{mv.version}"
    tag = f"{tag_part(mv.name)}:{tag_part(str(mv.version))}"
    origin = {"registry_uri": canonical, "run_id": mv.run_id or "", "source": mv.source or ""}
    try:
        model = bentoml.models.get(tag)
    except NotFound:
        model = None
    if model is not None and {k: model.info.metadata.get(k) for k in origin} != origin:
        raise TesseraError(
            f"BentoML's model store ({bentoml_home()}) already holds {tag} from another registry entry "
            f"({model.info.metadata.get('source')}); delete it (BENTOML_HOME={bentoml_home()} bentoml models delete {tag})"
        )
    if model is None:
        model = bentoml.mlflow.import_model(tag, canonical, metadata=origin, labels={"tessera": "registered-model"})
    mlmodel = mlflow.models.Model.load(model.path_of("mlflow_model"))
    if "transformers" not in mlmodel.flavors:
        raise TesseraError(f"{canonical} was not logged with MLflow's transformers flavor: the service cannot load it")
    task = (mlmodel.metadata or {}).get("task") or "llm/v1/completions"
    return model, canonical, task


def stage_build_context(ctx: Path, manifest: dict) -> Path:
    """`ctx` holding the service's sources, the manifest and a bentofile; returns the bentofile."""
    import yaml

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        shutil.copytree(SOURCE_ROOT / name, ctx / name, ignore=ignore)
    (ctx / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    bentofile = {
        "service": SERVICE,
        "name": manifest["bento_name"],
        "description": f"Tessera's OpenAI-compatible endpoint (/v1) over {manifest['model_uri']}",
        "labels": {"registered-model": manifest["registered_name"], "registered-version": manifest["registered_version"]},
        "include": [f"{name}/**" for name in SOURCES] + [MANIFEST],
        "exclude": ["__pycache__", "*.pyc"],
        "models": [manifest["bento_model"]],
        "python": {"packages": pinned_packages(), "lock_packages": False},
        "envs": [{"name": k, "value": v} for k, v in BENTO_ENVS.items()],
        "docker": {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}"},
    }
    path = ctx / "bentofile.yaml"
    path.write_text(yaml.safe_dump(bentofile, sort_keys=False))
    return path


def _check_home(home: Path) -> None:
    """BentoML fixes its home the first time a store is used in a process: it must be ours."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    actual = Path(BentoMLContainer.bentoml_home.get()).resolve()
    if actual != home.resolve():
        raise TesseraError(
            f"BentoML in this process already uses BENTOML_HOME={actual}, not {home}: "
            "build in a fresh process (python -m tasks.serve.bento MODEL_URI)"
        )


def build_bento(model_uri: str, *, name: str | None = None, version: str | None = None) -> str:
    """Build a Bento of the serving service with the registered model `model_uri` inside it; returns its tag
    (`<name>:<version>`, in the bento store of `$TESSERA_HOME/bentoml`). Needs no network."""
    apply_engine_defaults()
    home = bentoml_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(home)
    # bentoml build needs uv; where it is on no PATH, BentoML would try to pip-install it from the network
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("uv") is None:
        raise TesseraError("bentoml build needs uv (pip install uv); it is not on PATH")
    import bentoml

    _check_home(home)
    model, canonical, task = import_registered(model_uri)
    registered_name, registered_version = canonical.removeprefix("models:/").rsplit("/", 1)
    manifest = {
        "model_uri": canonical,
        "bento_model": str(model.tag),
        "task": task,
        "registered_name": registered_name,
        "registered_version": registered_version,
        "bento_name": tag_part(name or registered_name),
    }
    (home / "tmp").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-ctx-", dir=home / "tmp") as ctx:
        bentofile = stage_build_context(Path(ctx), manifest)
        bento = bentoml.bentos.build_bentofile(str(bentofile), build_ctx=ctx, version=version)
    return str(bento.tag)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.serve.bento", description=build_bento.__doc__)
    parser.add_argument("model_uri", help="models:/<name>/<version> (or @alias, /latest)")
    parser.add_argument("--name", help="the Bento's name (default: the registered model's name)")
    parser.add_argument("--version", help="the Bento's version (default: generated)")
    args = parser.parse_args(argv)
    try:
        tag = build_bento(args.model_uri, name=args.name, version=args.version)
    except TesseraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"BENTOML_HOME={bentoml_home()}", file=sys.stderr)
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
