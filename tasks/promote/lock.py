"""One retrain at a time per model: `model_lock` holds the model's Prefect global concurrency limit (one slot) while
its retrain runs; retrains of other models do not wait."""

from __future__ import annotations

import contextlib
import re
from contextlib import contextmanager

from tasks import stage_logger

LOCK_PREFIX = "tessera-model-"
LOCK_LEASE_SECONDS = 60  # Prefect's minimum; renewed every 45 s while held (see model_lock)


def lock_name(registered_model: str) -> str:
    return f"{LOCK_PREFIX}{registered_model}"


def ensure_limit(name: str) -> None:
    """The global concurrency limit `name` with one slot, created if missing (two creating it at once is fine)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass


def ephemeral_api() -> bool:
    """No Prefect server configured: each process runs a temporary one over the database in PREFECT_HOME."""
    from prefect.settings import get_current_settings

    return not get_current_settings().api.url


def _home_flock(name: str, timeout_seconds: float | None):
    """An exclusive lock beside the ephemeral API's database (PREFECT_HOME), which the kernel releases when its
    holder dies, however it dies. LockTimeout (a TimeoutError) after `timeout_seconds` of waiting."""
    from prefect.settings import get_current_settings

    from tessera.core.paths import file_lock

    return file_lock(get_current_settings().home / "tessera-locks" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.lock", timeout_seconds)


def _reclaim_leaked_slots(name: str) -> None:
    """Under the home lock on the ephemeral API, a slot still taken belongs to a holder that died without releasing
    it (its lease lived in its own temporary server, and no repossessor runs there): give it back."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
        if limit.active_slots:
            stage_logger().warning("%s: %d slot(s) left taken by a run that died; reclaimed", name, limit.active_slots)
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))


@contextmanager
def model_lock(registered_model: str, timeout_seconds: float | None = None):
    """Hold the model's slot (limit `tessera-model-<name>`, occupancy 1) while the block runs: retrains of one model
    queue, others do not wait; TimeoutError after `timeout_seconds` (default: wait as long as it takes).

    With a Prefect server the slot is a lease of LOCK_LEASE_SECONDS, renewed every 3/4 of it while held; a holder
    killed outright (SIGKILL) stops renewing, and the server's repossessor (every 15 s) frees the slot within
    LOCK_LEASE_SECONDS + 15 s of the last renewal. Prefect's ephemeral API runs no repossessor, and keeps leases in
    the memory of each process's own temporary server: a killed holder's slot would stay taken for good. There the
    slot is taken under an fcntl lock in PREFECT_HOME as well (the kernel drops it when its holder dies), and a
    slot found taken under that lock is a dead holder's, reclaimed at once."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency
    from prefect.context import FlowRunContext

    name = lock_name(registered_model)
    ensure_limit(name)
    context = FlowRunContext.get()
    holder = ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id) if context and context.flow_run else None
    log = stage_logger()
    log.info("waiting for %s (one retrain of %s at a time)", name, registered_model)
    with contextlib.ExitStack() as stack:
        if ephemeral_api():
            stack.enter_context(_home_flock(name, timeout_seconds))
            _reclaim_leaked_slots(name)
        stack.enter_context(concurrency(
            name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=LOCK_LEASE_SECONDS, strict=True, holder=holder,
        ))
        log.info("holding %s", name)
        yield
