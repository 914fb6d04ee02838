"""Named endpoints: one URL for a registered model, whose version can be replaced without a failed request.

An endpoint is two kinds of background process, each in its own session so that it outlives the shell,
CLI or flow run that started it:

- a router (tasks.serve.router) on the endpoint's host and port: the URL clients use, for the endpoint's
  whole lifetime;
- a backend: `bentoml serve` of tasks.serve.service on a free port of 127.0.0.1, serving one model
  version. The router forwards every request to the backend named in the endpoint's record.

An update starts the new version beside the old one, checks it with a real generation, then switches the
router (by writing the record), waits for the old backend's requests to finish and stops it. A version
that does not start or fails its check is stopped, and the old one keeps serving (rollback).

State: TESSERA_HOME/endpoints/NAME.json (the record, written atomically, readable by owner only: it holds
the API key), NAME.lock (held while a command changes the endpoint) and NAME/ (the processes' logs).
Status is checked when read: the processes must be alive and be the ones we started (same create time),
and /readyz must answer through the router.

Alias URIs (`models:/name@champion`) are followed by default: `update NAME` without `--model` serves
whatever version the alias points at then. A version URI (`models:/name/3`) stays on that version. Either way
a model server is given the version itself (`models:/name/3`), never the alias: when BentoML restarts one of
its workers, the worker loads the version the record names, not wherever the alias has moved since.

- records.py: the name, the record (EndpointRecord, Backend, EndpointStatus), its files, the lock held while it changes.
- processes.py: starting a detached process, stopping it with all it started, asking it over HTTP; the router.
- backends.py: a model server for one version: started, checked with a real generation, drained before it stops.
- status.py: the status as the processes say it now (get, list_endpoints, following).
- lifecycle.py: serve, update (health-checked rollout, rollback) and stop.

This module is the API the CLI, the deploy stage and the tests use; the modules above import each other, not it.
"""

from tasks.serve.endpoints.backends import check_generation, drain_seconds
from tasks.serve.endpoints.lifecycle import serve, stop, update
from tasks.serve.endpoints.processes import STATUS_PATH
from tasks.serve.endpoints.records import (
    Backend, EndpointRecord, EndpointStatus, default_name, load, now, record_file, save,
)
from tasks.serve.endpoints.status import following, get, list_endpoints

__all__ = [
    "STATUS_PATH", "Backend", "EndpointRecord", "EndpointStatus", "check_generation", "default_name", "drain_seconds",
    "following", "get", "list_endpoints", "load", "now", "record_file", "save", "serve", "stop", "update",
]
