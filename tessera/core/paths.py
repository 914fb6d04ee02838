"""Where things live: TESSERA_HOME and the UC-style volume paths that resolve under it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tessera.core.errors import LockTimeout, TesseraError

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def tessera_home() -> Path:
    return Path(os.environ.get("TESSERA_HOME", ".tessera")).expanduser().resolve()


def volumes_root() -> Path:
    return Path(os.environ.get("TESSERA_VOLUMES_ROOT", tessera_home() / "volumes")).expanduser().resolve()


def runs_dir() -> Path:
    return tessera_home() / "runs"


def prepared_dir() -> Path:
    """The prepared-data cache: a folder per cache key (tasks/prepare)."""
    return tessera_home() / "prepared"


def models_dir() -> Path:
    return tessera_home() / "models"


def mlflow_tracking_uri() -> str:
    """The user's MLflow server if they set one, else the embedded SQLite store in TESSERA_HOME."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{tessera_home() / 'mlflow' / 'mlflow.db'}"


def mlflow_artifacts_root() -> Path:
    return tessera_home() / "mlflow" / "artifacts"


def is_volume_path(path: str) -> bool:
    return path.startswith(("dbfs:/Volumes/", "/Volumes/")) or path in ("dbfs:/Volumes", "/Volumes")


def resolve_data_path(path: str) -> Path:
    """Map `dbfs:/Volumes/c/s/v/...` or `/Volumes/c/s/v/...` under the volumes root; anything else is local.

    A volume path must name catalog, schema and volume, and may not leave its volume (by `..` or a
    symlink): the managed service refused both, and so do we.
    """
    if not is_volume_path(path):
        return Path(path).expanduser().resolve()
    rel = path.removeprefix("dbfs:").removeprefix("/Volumes").strip("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if len(parts) < 3:
        raise TesseraError(
            f"{path}: a volume path needs /Volumes/<catalog>/<schema>/<volume>/..., got {len(parts)} level(s)"
        )
    if ".." in parts:
        raise TesseraError(f"{path}: '..' is not allowed in a volume path")
    volume_dir = volumes_root().joinpath(*parts[:3])
    target = volume_dir.joinpath(*parts[3:])
    real_volume, real_target = os.path.realpath(volume_dir), os.path.realpath(target)
    if real_target != real_volume and not real_target.startswith(real_volume + os.sep):
        raise TesseraError(f"{path}: resolves outside its volume {'/'.join(parts[:3])} (through a symlink)")
    return Path(real_target)


def apply_engine_defaults() -> None:
    """Embedded defaults for the engines we start: state in TESSERA_HOME, telemetry off. Users' settings win."""
    if not os.environ.get("PREFECT_API_URL"):  # the embedded server's home (tessera.core.prefect_server)
        os.environ.setdefault("PREFECT_HOME", str(tessera_home() / "prefect"))
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)


@contextmanager
def file_lock(path: Path, timeout: float | None = None) -> Iterator[None]:
    """An exclusive inter-process lock (fcntl.flock) on `path`, created if missing; released when the block ends
    or the process dies. Not reentrant: a second `file_lock` on the same path in one thread waits for the first.
    With `timeout`, LockTimeout (a TesseraError and a TimeoutError) after that many seconds of waiting."""
    import fcntl
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if timeout is None:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockTimeout(f"{path}: still locked by another process after {timeout:.0f} s") from None
                    time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_locked(path: Path) -> bool:
    """Whether another holder has `file_lock` on `path` now: a probe that takes and drops a shared lock at once,
    never waiting (so a reader can tell a command at work from a record its dead holder left behind)."""
    import fcntl

    path = Path(path)
    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def home_lock(name: str, timeout: float | None = None):
    """`file_lock` on TESSERA_HOME/.locks/<name>.lock: what processes sharing one home create once (an embedded
    store's schema, a built model, a prepared-data cache entry) is created under it."""
    return file_lock(tessera_home() / ".locks" / f"{name}.lock", timeout)


@contextmanager
def replacing_dir(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` to write into; when the block ends without an error, it takes `out`'s place,
    a previous output included (a run re-executed under its name). Renames only, so `out` is never half-written:
    it is the old output or the new one. A staging folder left by a killed writer is never reused."""
    import shutil

    out = Path(out)
    staging, previous = out.with_name(out.name + ".partial"), out.with_name(out.name + ".previous")
    for stale in (staging, previous):
        shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """The one durable atomic write: readers in other processes see the old file or the new one, never half of one,
    and a crash (of the process or the machine) right after it returns loses neither. A temp file beside `path`
    (same file system, so the rename is atomic; mode 0600, so a record holding an API key is its owner's only) is
    written and fsynced, renamed over `path`, then the folder is fsynced so that the rename itself is on disk."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
