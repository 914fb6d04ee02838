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
              "created_at", "started_at", "completed_at", "experiment_id", "run_id", "registered_model_version",
              "save_folder", "details"]
    for f in fields:
        value = getattr(run, f)
        if value is not None:
            print(f"{f:26} {value}")


def follow(name: str, poll: float = 1.0) -> int:
    """Print a run's events as they come; the exit code says how it ended."""
    from tessera import sdk

    seen = 0
    while True:
        run = sdk.get(name)
        events = sdk.get_events(name)
        for e in events[seen:]:
            print(f"{e['time'][11:19]} [{e['stage']}] {e['message']}", flush=True)
        seen = len(events)
        if run.status.finished:
            break
        time.sleep(poll)
    if run.status.value == "COMPLETED":
        print(f"run {name} completed: {run.registered_model_version}")
        return 0
    print(f"error: run {name} {run.status.value.lower()}: {run.details}", file=sys.stderr)
    return EXIT_FAILED


def cmd_create(args) -> int:
    from tessera import sdk

    run = sdk.create(
        model=args.model, train_data_path=args.train_data_path, register_to=args.register_to,
        task_type=args.task_type, eval_data_path=args.eval_data_path, eval_prompts=args.eval_prompt,
        custom_weights_path=args.custom_weights_path, training_duration=args.training_duration,
        learning_rate=args.learning_rate, context_length=args.context_length,
        validate_inputs=not args.no_validate, data_prep_cluster_id=args.data_prep_cluster_id,
        experiment_path=args.experiment_path,
    )
    print(f"started run {run.name} (follow it: tessera runs events {run.name} --follow)", flush=True)
    return follow(run.name) if args.wait else 0


def cmd_runs(args) -> int:
    from tessera import sdk

    if args.action == "list":
        for run in sdk.list():
            print(f"{run.name:36} {run.status.value:11} {run.model:32} {run.created_at:%Y-%m-%d %H:%M}")
        return 0
    if not args.name:
        raise SystemExit(f"tessera runs {args.action}: a run name is required")
    if args.action == "get":
        _print_run(sdk.get(args.name))
    elif args.action == "cancel":
        sdk.cancel(args.name)
        print(f"run {args.name} stopped")
    elif args.action == "events":
        if args.follow:
            return follow(args.name)
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


def cmd_serve(args) -> int:
    import os

    from tessera.endpoint import serve_command, serve_env
    from tessera.paths import apply_engine_defaults

    apply_engine_defaults()
    env = serve_env(args.model_uri, args.api_key or os.environ.get("TESSERA_API_KEY"))
    print(f"serving {args.model_uri} on http://{args.host}:{args.port}/v1/chat/completions", flush=True)
    command = serve_command(args.host, args.port)
    os.execve(command[0], command, env)  # BentoML in this process's place: Ctrl-C and SIGTERM reach it directly


def cmd_demo(args) -> int:
    from tessera.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera", description="Fine-tune, register and serve foundation models on your own machines.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="start a fine-tuning run (like fm.create)")
    c.add_argument("--model", required=True, help="catalog model, Hugging Face id or local directory")
    c.add_argument("--train-data-path", required=True, help="/Volumes/c/s/v/file.jsonl, a local path, ...")
    c.add_argument("--register-to", required=True, help="catalog.schema or catalog.schema.model")
    c.add_argument("--task-type", default="CHAT_COMPLETION", help="CHAT_COMPLETION, INSTRUCTION_FINETUNE or CONTINUED_PRETRAIN")
    c.add_argument("--eval-data-path")
    c.add_argument("--eval-prompt", action="append", help="a prompt to generate from after training (repeatable)")
    c.add_argument("--custom-weights-path", help="start from these weights instead of the base model's")
    c.add_argument("--training-duration", default="1ep", help="<n>ep, <n>ba (steps) or <n>tok (default 1ep)")
    c.add_argument("--learning-rate", type=float)
    c.add_argument("--context-length", type=int)
    c.add_argument("--no-validate", action="store_true", help="skip the full data validation pass")
    c.add_argument("--data-prep-cluster-id", help="Spark for data prep: sc://host:port, local[*], spark://...")
    c.add_argument("--experiment-path", help="MLflow experiment (default /Users/<you>/tessera)")
    c.add_argument("--wait", action="store_true", help="follow the run; exit non-zero if it fails")
    c.set_defaults(func=cmd_create)

    r = sub.add_parser("runs", help="list, inspect, follow or cancel runs")
    r.add_argument("action", choices=["list", "get", "cancel", "events"])
    r.add_argument("name", nargs="?")
    r.add_argument("--follow", action="store_true", help="with events: keep printing until the run ends")
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

    s = sub.add_parser("serve", help="serve a registered model with an OpenAI-compatible API")
    s.add_argument("model_uri", help="models:/<name>/<version> or models:/<name>@<alias>")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=3000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer <key>' (or set TESSERA_API_KEY)")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="the whole pipeline on embedded defaults, then one question to the served model")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tessera.errors import ConfigError, TesseraError

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
