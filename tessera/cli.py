"""`tessera`: the SDK from a shell. Imports stay inside commands so `tessera --help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
import time

EXIT_FAILED = 1
EXIT_USAGE = 2


def _print_run(run) -> None:
    fields = ["name", "status", "model", "task_type", "train_data_path", "register_to", "training_duration",
              "training_config", "created_at", "started_at", "estimated_end_time", "completed_at", "experiment_id", "run_id",
              "registered_model_version", "save_folder", "details"]
    shown = run.model_dump(mode="json")  # enumerations as their names, settings as a dict
    for f in fields:
        if shown[f] is not None:
            print(f"{f:26} {shown[f]}")


def run_parameters(args) -> dict:
    """A run's parameters from `--config run.yaml`, then the command line's options, then each `--set key=value`
    (a run parameter or a training_config key); later ones win. Unknown keys are refused, naming them."""
    import yaml

    from tessera.core.config import RunParameters, TrainingSettings
    from tessera.core.errors import ConfigError

    params: dict = {}
    if args.config:
        try:
            params = yaml.safe_load(open(args.config)) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--config {args.config}: {exc}") from None
        if not isinstance(params, dict):
            raise ConfigError(f"--config {args.config}: expected a mapping of run parameters")
    params.update({k: v for k, v in vars(args).items() if k in RunParameters.model_fields and v is not None})
    training = dict(params.get("training_config") or {})
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        value = yaml.safe_load(text)  # 2048 -> int, true -> bool, 1e-5 -> float, text stays text
        if key in TrainingSettings.model_fields:
            training[key] = value
        elif key in RunParameters.model_fields and key != "training_config":
            params[key] = value
        else:
            raise ConfigError(f"--set {key}: unknown key (a run parameter or one of: {', '.join(TrainingSettings.model_fields)})")
    params["training_config"] = training
    return params


def cmd_create(args) -> int:
    from tessera import sdk

    run = sdk.create(**run_parameters(args))
    print(f"started run {run.name} (follow it: tessera runs events {run.name} --follow)", flush=True)
    return sdk.print_until_done(run.name) if args.wait else 0


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """One option per run parameter (tessera.core.config.RunParameters), with its description as help."""
    from typing import get_args

    from tessera.core.config import RunParameters, TaskType

    for name, field in RunParameters.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "training_config":
            continue
        if name == "validate_inputs":
            parser.add_argument("--no-validate", dest=name, action="store_false", default=None, help="do not " + field.description)
        elif name == "eval_prompts":
            parser.add_argument("--eval-prompt", dest=name, action="append", help=field.description + " (repeatable)")
        elif name == "task_type":
            parser.add_argument(flag, choices=list(TaskType.__members__), help=f"{field.description} (default {field.default.value})")
        else:
            kind = next((t for t in (int, float) if t in (field.annotation, *get_args(field.annotation))), str)
            parser.add_argument(flag, type=kind, help=field.description)


def cmd_runs(args) -> int:
    from tessera import sdk

    if args.action == "list":
        for run in sdk.list():
            what = run.details if run.status.value == "UNKNOWN" else run.model
            print(f"{run.name:36} {run.status.value:11} {what:32} {run.created_at:%Y-%m-%d %H:%M}")
        return 0
    if not args.name:
        raise SystemExit(f"tessera runs {args.action}: a run name is required")
    if args.action == "get":
        _print_run(sdk.get(args.name))
    elif args.action == "cancel":
        sdk.cancel(args.name)
        print(f"run {args.name} stopped")
    elif args.action == "delete":
        for path in sdk.delete(args.name):
            print(f"removed {path}")
        print(f"run {args.name}'s local files are removed (its MLflow run and registered versions stay)")
    elif args.action == "checkpoints":
        found = sdk.get_checkpoints(args.name)
        if not found:
            print(f"run {args.name} has no complete checkpoint")
        for c in found:
            train = f"{c.train_loss:.4f}" if c.train_loss is not None else "-"
            evaluated = f"{c.eval_loss:.4f}" if c.eval_loss is not None else "-"
            print(f"step {c.step:<7} epoch {c.epoch:<6.2f} tokens {c.tokens_seen:<11} train_loss {train:8} "
                  f"eval_loss {evaluated:8} {c.reason:9} {c.path}")
    elif args.action == "resume":
        run = sdk.resume(args.name)
        print(f"run {run.name} resumed ({run.status.value}); follow it: tessera runs events {run.name} --follow")
        if args.follow:
            return sdk.print_until_done(run.name)
    elif args.action == "join":  # this node's share of a run over several nodes, in the foreground
        from tasks.train.nodes import join

        return join(args.name)
    elif args.action == "events":
        if args.follow:
            return sdk.print_until_done(args.name)
        for e in sdk.get_events(args.name):
            print(f"{e['time'][11:19]} [{e['stage']}] {e['message']}")
    return 0


def cmd_validate(args) -> int:
    from tessera import sdk

    report = sdk.validate_data(
        args.train_data_path, model=args.model, task_type=args.task_type,
        context_length=args.context_length, training_duration=args.training_duration,
        data_prep_cluster_id=args.data_prep_cluster_id,
    )
    print(report.model_dump_json(indent=2) if args.json else report.render())
    return 0 if report.valid else EXIT_FAILED


def cmd_models(args) -> int:
    from tessera import sdk

    models = sdk.get_models()
    if args.json:
        print(json.dumps([m.model_dump(mode="json") for m in models], indent=2))
        return 0
    for m in models:
        note = f"retired {m.retired}, use {m.replacement}" if m.retired else (m.description or "")
        print(f"{m.name:42} {m.context_length:>7}  {note}")
    return 0


class _Stop(Exception):
    """SIGTERM or SIGHUP reached a foreground `tessera serve`."""


def _raise_stop(signum, frame):
    raise _Stop()


def cmd_bento(args) -> int:
    from tasks.serve.bento import bentoml_home, build_bento

    tag = build_bento(args.model_uri, name=args.name, version=args.version)
    print(f"built Bento {tag}; serve it with: BENTOML_HOME={bentoml_home()} bentoml serve {tag} --host 127.0.0.1 --port 3000")
    return 0


def cmd_serve(args) -> int:
    """Start a named endpoint (router + model server, both in the background). In the foreground (the default)
    wait, and stop it on Ctrl-C, SIGTERM or SIGHUP; with --detach, return once it answers and leave it running."""
    import os
    import signal

    from tasks.serve import endpoints
    from tessera.core.paths import apply_engine_defaults
    from tessera.core.processes import process_alive

    apply_engine_defaults()
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}  # a stop while starting cleans up too
    name = args.name or endpoints.default_name(args.model_uri)
    print(f"starting endpoint {name}: {args.model_uri}", flush=True)
    try:
        record = endpoints.serve(args.model_uri, name=name, host=args.host, port=args.port,
                                 api_key=args.api_key or os.environ.get("TESSERA_API_KEY"), follow=args.follow)
    except _Stop:
        print("interrupted", file=sys.stderr)
        return 130
    follows = f", following {record.model_uri}" if record.follow else ""
    print(f"endpoint {record.name} ready at {record.url}/v1 (version {record.version}{follows})", flush=True)
    if args.detach:
        for s, handler in previous.items():
            signal.signal(s, handler)
        print(f"it runs in the background: tessera endpoints get|update|stop {record.name}")
        return 0
    print("Ctrl-C stops it (tessera serve --detach leaves it running)", flush=True)
    try:
        while True:
            time.sleep(1)
            record = endpoints.load(record.name)
            if record.status.value == "STOPPED" or not process_alive(record.router_pid, record.router_create_time):
                print(f"endpoint {record.name} was stopped", file=sys.stderr)
                return 0 if record.status.value == "STOPPED" else EXIT_FAILED
    except (KeyboardInterrupt, _Stop):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping takes a few seconds: let it finish
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        endpoints.stop(record.name)
        print(f"endpoint {record.name} stopped")
        return 0


def _print_endpoint(record) -> None:
    backend = record.backend
    rows = {
        "name": record.name, "status": record.status.value, "model_uri": record.model_uri,
        "follows_alias": "yes" if record.follow else "no", "version": record.version, "url": record.url,
        "api_key": "required" if record.api_key else None, "router_pid": record.router_pid,
        "server_pid": backend and backend.pid, "server_url": backend and backend.url,
        "updating_to": record.candidate and f"version {record.candidate.version} (pid {record.candidate.pid})",
        "created_at": record.created_at, "updated_at": record.updated_at, "details": record.details,
        "server_log": backend and backend.log,
    }
    for key, value in rows.items():
        if value is not None:
            print(f"{key:14} {value}")
    if record.history:
        print("history")
        for line in record.history[-10:]:
            print(f"  {line}")


def cmd_endpoints(args) -> int:
    from tasks.serve import endpoints

    if args.action == "list":
        found = endpoints.list_endpoints()
        if args.json:
            print(json.dumps([r.model_dump(mode="json", exclude={"api_key"}) for r in found], indent=2))
            return 0
        for r in found:
            print(f"{r.name:24} {r.status.value:9} {'v' + r.version if r.version else '-':5} {r.model_uri:44} {r.url}")
        return 0
    if not args.name:
        raise SystemExit(f"tessera endpoints {args.action}: an endpoint name is required")
    if args.action != "update" and (args.model or args.follow is not None):
        raise SystemExit(f"tessera endpoints {args.action}: --model and --follow go with update")
    if args.action == "get":
        record = endpoints.get(args.name)
        if args.json:
            print(record.model_copy(update={"api_key": None}).model_dump_json(indent=2, exclude={"api_key"}))
        else:
            _print_endpoint(record)
        return 0 if record.status.value in ("READY", "UPDATING", "STARTING", "STOPPED") else EXIT_FAILED
    if args.action == "update":
        from tessera.core.paths import apply_engine_defaults

        import signal

        apply_engine_defaults()
        before = endpoints.load(args.name)
        print(f"updating endpoint {args.name} (version {before.version}) to {args.model or before.model_uri}", flush=True)
        signal.signal(signal.SIGTERM, _raise_stop)  # stopped midway: the new server is stopped, the old one serves on
        try:
            record = endpoints.update(args.name, model_uri=args.model, follow=args.follow)
        except _Stop:
            print(f"interrupted; the endpoint serves on (tessera endpoints get {args.name})", file=sys.stderr)
            return 130
        print(f"endpoint {record.name}: {record.details} at {record.url}")
        return 0
    endpoints.stop(args.name)
    print(f"endpoint {args.name} stopped")
    return 0


def cmd_cache(args) -> int:
    from tessera import sdk

    removed, kept = sdk.prune_prepared_cache()
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} prepared dataset(s) removed, {len(kept)} kept (needed by a run still going or resumable)")
    return 0


def cmd_server(args) -> int:
    """The embedded Prefect server of this TESSERA_HOME, which records the runs started here and shows them in its UI;
    `stop` also stops the home's fork servers (tessera.core.forkserver)."""
    import os

    from tessera.core import forkserver, prefect_server
    from tessera.core.paths import apply_engine_defaults

    apply_engine_defaults()
    if args.action == "stop" and forkserver.stop_all():
        print(f"stopped the fork server(s) in {forkserver.servers_dir()} (they end once what they forked has ended)")
    if os.environ.get("PREFECT_API_URL"):
        print(f"runs are recorded by the Prefect server you set: PREFECT_API_URL={os.environ['PREFECT_API_URL']} "
              "(the embedded server is used only when it is unset)")
        return 0
    if args.action == "stop":
        stopped = prefect_server.stop()
        print(f"stopped the embedded Prefect server at {stopped.ui_url}" if stopped else "no embedded Prefect server runs")
        return 0
    server = prefect_server.ensure_running() if args.action == "start" else prefect_server.running()
    if server is None:
        print(f"no embedded Prefect server runs for {prefect_server.prefect_dir()} (the next run starts it; or: tessera server start)")
        return 0
    print(f"Prefect UI: {server.ui_url}   (API {server.url}, pid {server.pid}, home {prefect_server.prefect_dir()})")
    return 0


def cmd_demo(args) -> int:
    from tessera.demo import run_demo

    return run_demo(args.model)


def cmd_plan(args) -> int:
    """The memory plan of a run, offline: from the catalog's (or a local config.json's) architecture."""
    from pydantic import ValidationError

    from tessera.core.catalog import DEFAULT_CONTEXT_CAP, catalog, resolve_model
    from tessera.core.config import TrainingSettings
    from tessera.core.errors import ConfigError
    from tessera.core.memory import Hardware, parameters_text, parse_bytes
    from tessera.core.run_plan import hardware_settings, plan_settings

    params = run_parameters(args)
    try:
        settings = TrainingSettings(**params["training_config"])
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"training_config.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    spec = catalog().get(args.model)
    if spec is not None and spec.architecture is not None:  # the catalog states it: nothing to build or download
        maximum, arch = spec.context_length, spec.architecture
    else:  # a local directory's config.json
        model = resolve_model(args.model)
        maximum, arch = model.max_context_length, model.architecture
    if arch is None:
        raise ConfigError(f"model {args.model}: its config does not state a Llama-style shape, so its memory cannot be planned")
    context_length = params.get("context_length") or min(maximum, DEFAULT_CONTEXT_CAP)
    if context_length > maximum:
        raise ConfigError(f"context_length {context_length}: above {args.model}'s maximum of {maximum} tokens")
    if args.gpus or args.gpu_memory:
        hardware = Hardware(device="cuda", count=args.gpus or 1, memory_bytes=parse_bytes(args.gpu_memory or "80GB"))
    else:
        hardware = Hardware.detect()
    if args.nproc:
        settings = settings.model_copy(update={"nproc_per_node": args.nproc})
    if args.nodes:
        settings = settings.model_copy(update={"nnodes": args.nodes})
    # the train stage's own decisions (tessera.core.run_plan), for this model, hardware and context
    decided, sources = hardware_settings(settings, hardware)
    nproc = decided.get("nproc_per_node", settings.nproc_per_node)
    print(f"{args.model}: {parameters_text(arch.parameters)}, context {context_length} tokens, {decided['precision']} "
          f"compute ({sources['precision']}), {decided['attn_implementation']} attention, "
          f"{nproc} training process{'es' if nproc != 1 else ''} on {hardware.describe()}"
          + (f", on each of {settings.nnodes} nodes" if settings.nnodes > 1 else ""))
    try:
        _, _, plan = plan_settings(settings, arch, hardware, context_length, args.model)
    except ConfigError as exc:  # a plan that does not fit is an answer, not a usage error
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(plan.render())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera", description="Fine-tune, register and serve foundation models on your own machines.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="start a fine-tuning run (like fm.create)")
    add_run_options(c)
    c.add_argument("--config", help="a run's YAML: run parameters, and training settings under training_config:")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="a run parameter or training setting (repeatable)")
    c.add_argument("--wait", action="store_true", help="follow the run; exit non-zero if it fails")
    c.set_defaults(func=cmd_create)

    r = sub.add_parser("runs", help="list, inspect, follow, cancel or resume runs, list their checkpoints, join one from another node")
    r.add_argument("action", choices=["list", "get", "cancel", "events", "checkpoints", "resume", "delete", "join"])
    r.add_argument("name", nargs="?")
    r.add_argument("--follow", action="store_true", help="with events or resume: keep printing until the run ends")
    r.set_defaults(func=cmd_runs)

    v = sub.add_parser("validate", help="check training data and estimate tokens and cost, before training")
    v.add_argument("train_data_path")
    v.add_argument("--task-type", default="CHAT_COMPLETION", help="CHAT_COMPLETION, INSTRUCTION_FINETUNE or CONTINUED_PRETRAIN")
    v.add_argument("--model", required=True)
    v.add_argument("--context-length", type=int)
    v.add_argument("--training-duration", default="1ep")
    v.add_argument("--data-prep-cluster-id", help="Spark for data prep: sc://host:port, local[*], spark://...")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")
    v.set_defaults(func=cmd_validate)

    m = sub.add_parser("models", help="the model catalog")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser("serve", help="serve a registered model as a named endpoint with an OpenAI-compatible API")
    s.add_argument("model_uri", help="models:/<name>/<version> or models:/<name>@<alias>")
    s.add_argument("--name", help="the endpoint's name (default: the model's, models:/main.support.bot/1 -> bot)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, help="the endpoint's port for its whole life (default 3000, or a free one if taken)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer <key>' (or set TESSERA_API_KEY)")
    s.add_argument("--detach", action="store_true", help="return once it answers and leave it running (stop: tessera endpoints stop NAME)")
    s.add_argument("--follow", action=argparse.BooleanOptionalAction, default=None,
                   help="whether `tessera endpoints update NAME` re-resolves the alias (default: yes for @alias URIs)")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("endpoints", help="list, inspect, update (health-checked, rolled back on failure) or stop endpoints")
    e.add_argument("action", choices=["list", "get", "update", "stop"])
    e.add_argument("name", nargs="?")
    e.add_argument("--model", help="with update: serve this models:/ URI instead (default: the endpoint's, an alias re-resolved)")
    e.add_argument("--follow", action=argparse.BooleanOptionalAction, default=None,
                   help="with update: whether the endpoint follows the alias of --model (default: yes for @alias URIs)")
    e.add_argument("--json", action="store_true", help="with list or get: JSON")
    e.set_defaults(func=cmd_endpoints)

    b = sub.add_parser("bento", help="build a Bento (BentoML's deployable) of the service with a registered model inside, offline")
    b.add_argument("model_uri", help="models:/<name>/<version> (or @alias, /latest): frozen to the version it names now")
    b.add_argument("--name", help="the Bento's name (default: the registered model's name)")
    b.add_argument("--version", help="the Bento's version (default: generated)")
    b.set_defaults(func=cmd_bento)

    pl = sub.add_parser("plan", help="the memory plan of a run (micro-batch, activation checkpointing), offline")
    pl.add_argument("--model", required=True, help="catalog model or local directory")
    pl.add_argument("--config", help="a run's YAML: context_length, and training settings under training_config:")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="a run parameter or training setting (repeatable)")
    pl.add_argument("--context-length", type=int, help="tokens per packed row (default: the run's, else min(model maximum, 4096))")
    pl.add_argument("--gpus", type=int, help="plan for this many GPUs on the node (default: this machine's hardware)")
    pl.add_argument("--gpu-memory", help="memory of each GPU, e.g. 80GB (GB = 10^9 bytes) or 80GiB (default 80GB)")
    pl.add_argument("--nodes", type=int, help="machines training together, each with --gpus GPUs (default: training_config.nnodes, 1)")
    pl.add_argument("--nproc", type=int, help="training processes (default: training_config.nproc_per_node, else one per GPU, 1 on CPU)")
    pl.set_defaults(func=cmd_plan)

    ca = sub.add_parser("cache", help="the prepared-data cache: prune what no run still going or resumable needs")
    ca.add_argument("action", choices=["prune"])
    ca.set_defaults(func=cmd_cache)

    sv = sub.add_parser("server", help="the embedded Prefect server that records runs started here (its UI shows them)")
    sv.add_argument("action", choices=["status", "start", "stop"])
    sv.set_defaults(func=cmd_server)

    d = sub.add_parser("demo", help="the whole pipeline on embedded defaults, then one question to the served model")
    d.add_argument(
        "--model", default="tessera/tiny-chat",
        help="tessera/tiny-chat (default: a toy model, quick) or tessera/smollm2-135m-instruct (a real pretrained model, ~15 min on 2 cores; needs `make real-model`)",
    )
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tessera.core.errors import ConfigError, TesseraError

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TesseraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
