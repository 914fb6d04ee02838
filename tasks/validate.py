"""Stage: validate, and the data report (the managed service's "validate and estimate tokens" notebook).

A run's inputs are checked up front (model, context length, paths, columns; tables pinned to a version).
Every record is then checked by data prep as it streams past, with the same rules the trainer's data
needs (tessera.core.records), before anything is written; the token figures of the report come from the
prepared data itself, so the estimate is what training will really see.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from prefect import task
from pydantic import BaseModel, Field

from tasks.prepare.stage import PreparedData, prepare, row_tokens
from tessera.core import runs, sources
from tessera.core.config import RunConfig, TaskType
from tessera.core.errors import DataValidationError
from tessera.core.records import valid_records
from tessera.core.run_plan import ResolvedRun, RunPlan, plan_run, resolve_run
from tessera.core.runs import RunRecord

MIN_PRETRAIN_TOKENS = 1_500_000
MAX_EPOCHS = 4


class TokenStats(BaseModel):
    min: int
    mean: float
    p50: float
    p95: float
    max: int


class DataReport(BaseModel):
    data_path: str
    task_type: str
    model: str
    context_length: int
    valid: bool
    examples: int
    errors: list[str] = []
    error_count: int = 0
    tokens_per_example: TokenStats | None = None
    length_histogram: list[tuple[int, int, int]] = []
    truncated: int = 0
    trainable_tokens: int = 0
    tokens_per_epoch: int = 0
    training_duration: str
    billed_tokens: int = 0
    optimizer_steps: int = 0
    epochs: float = 0.0
    packed_rows: int = 0
    packing_fill: float = 0.0
    global_batch_tokens: int = 0
    micro_batch_tokens: int = 0
    memory_plan: str = ""
    skipped_files: dict[str, int] = {}  # a text folder's files that are not documents, by reason
    warnings: list[str] = []
    plan: RunPlan | None = Field(None, exclude=True)  # what the figures above come from; the train stage runs it

    def render(self) -> str:
        lines = [f"{self.data_path} ({self.task_type}, model {self.model}, context length {self.context_length})"]
        lines.append(f"examples: {self.examples}")
        if self.skipped_files:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped_files.items())
            lines.append(f"skipped files: {sum(self.skipped_files.values())} ({reasons})")
        if not self.valid:
            lines.append(f"INVALID: {self.error_count} error(s)")
            lines += [f"  {e}" for e in self.errors]
            if self.error_count > len(self.errors):
                lines.append(f"  ... and {self.error_count - len(self.errors)} more error(s)")
            return "\n".join(lines)
        t = self.tokens_per_example
        lines += [
            f"tokens per example: min {t.min}, mean {t.mean:.1f}, p50 {t.p50:.0f}, p95 {t.p95:.0f}, max {t.max}",
            f"truncated at {self.context_length} tokens: {self.truncated}",
            f"trainable tokens: {self.trainable_tokens:,}",
            f"tokens per epoch: {self.tokens_per_epoch:,}",
            f"training duration {self.training_duration}: {self.billed_tokens:,} tokens "
            f"({self.epochs:.2f} epochs, {self.optimizer_steps} optimizer steps)",
            f"packed rows: {self.packed_rows} (fill {100 * self.packing_fill:.1f}%)",
            f"batch: {self.global_batch_tokens:,} tokens per optimizer step, {self.micro_batch_tokens:,} per micro-batch",
            self.memory_plan,
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def invalid_report(run: ResolvedRun, data_path: str, error: DataValidationError) -> DataReport:
    config = run.config
    return DataReport(
        data_path=data_path, task_type=config.task_type.value, model=config.model,
        context_length=run.model.context_length, valid=False,
        examples=error.examples_checked or 0, errors=error.errors[: DataValidationError.MAX_SHOWN],
        error_count=len(error.errors), training_duration=config.training_duration,
    )


def eval_is_training_data(config: RunConfig) -> str | None:
    """How eval_data_path is the training data itself (the same path, the same content under another path, the same
    table at the same version), or None when it is other data. A file's or folder's content hash and a table's
    version are the source fingerprints that key the prepared data."""
    held, train = config.eval_data_path, config.train_data_path
    if not held:
        return None
    if held == train:
        return "the same path"
    ours, theirs = (sources.resolve_source(path, config.task_type) for path in (train, held))
    if ours.fingerprint() != theirs.fingerprint():
        return None
    return f"the same table at version {ours.version}" if ours.kind == "delta" else "the same content"


def record_key(task_type: TaskType, data: dict) -> bytes:
    """A record as training reads it (a chat's roles and contents, a prompt and its answer, a document's text), so
    that one conversation matches itself in a file and in a table."""
    if task_type is TaskType.CHAT_COMPLETION:
        fields = [[m["role"], m["content"]] for m in data["messages"]]
    elif task_type is TaskType.INSTRUCTION_FINETUNE:
        fields = [data["prompt"], data["response"] if "response" in data else data["completion"]]
    else:
        fields = data["text"]
    return hashlib.sha256(json.dumps(fields).encode()).digest()


def _record_keys(config: RunConfig, data_path: str) -> Iterator[bytes]:
    return (record_key(config.task_type, r.data) for r in valid_records(data_path, config.task_type))


def eval_overlap(config: RunConfig) -> tuple[int, int]:
    """(distinct eval records that are also training records, distinct eval records). The eval set is held in
    memory as hashes; the training data streams past."""
    held = set(_record_keys(config, config.eval_data_path))
    shared = {key for key in _record_keys(config, config.train_data_path) if key in held}
    return len(shared), len(held)


def eval_warnings(config: RunConfig) -> list[str]:
    """An eval loss on training records measures memorizing: finetune may do it (the demo does), but is told."""
    if not config.eval_data_path:
        return []
    if how := eval_is_training_data(config):
        return [f"eval_data_path {config.eval_data_path} is the training data ({how}): its eval loss measures "
                "memorizing, not how the model does on new data"]
    shared, total = eval_overlap(config)
    if not shared:
        return []
    return [f"{shared} of the {total} records of eval_data_path {config.eval_data_path} are also in the training data: "
            "on those the eval loss measures memorizing"]


def data_report(run: ResolvedRun, prepared: PreparedData, data_path: str | None = None) -> DataReport:
    """Token statistics, the billed-token estimate and warnings for valid, prepared data, and the run's plan they
    come from (made here, once: the train stage runs this plan)."""
    config, s = run.config, prepared.stats
    plan = plan_run(config, run.model, row_tokens(prepared.path), s.context_length)
    epochs = plan.steps.epochs
    warnings = []
    if config.task_type is TaskType.CONTINUED_PRETRAIN and s.tokens < MIN_PRETRAIN_TOKENS:
        warnings.append(f"only {s.tokens:,} tokens; continued pretraining usually needs at least {MIN_PRETRAIN_TOKENS:,}")
    if config.task_type is not TaskType.CONTINUED_PRETRAIN and s.tokens < s.context_length:
        warnings.append(f"only {s.tokens:,} tokens, less than one full context length ({s.context_length})")
    if epochs > MAX_EPOCHS:
        warnings.append(f"{epochs:.1f} epochs: more than {MAX_EPOCHS} risks overfitting")
    if s.truncated:
        warnings.append(f"{s.truncated} example(s) longer than the context length were truncated")
    if s.skipped_files:
        warnings.append(f"{sum(s.skipped_files.values())} file(s) in the folder are not documents and will not be trained on")
    if data_path in (None, config.train_data_path):
        warnings += eval_warnings(config)
    billed = plan.steps.tokens
    return DataReport(
        data_path=data_path or config.train_data_path, task_type=config.task_type.value,
        model=config.model, context_length=s.context_length, valid=True, examples=s.examples,
        tokens_per_example=TokenStats(min=s.length_min, mean=s.length_mean, p50=s.length_p50, p95=s.length_p95, max=s.length_max),
        length_histogram=s.length_histogram, truncated=s.truncated, trainable_tokens=s.trainable_tokens,
        tokens_per_epoch=s.tokens, training_duration=config.training_duration, billed_tokens=billed,
        optimizer_steps=plan.steps.total_steps, epochs=epochs, packed_rows=s.rows, packing_fill=s.fill,
        global_batch_tokens=plan.settings.global_batch_tokens, micro_batch_tokens=plan.settings.micro_batch_tokens,
        memory_plan=plan.memory.render(), warnings=warnings,
        skipped_files=s.skipped_files, plan=plan,
    )


def report_for(run: ResolvedRun, data_path: str | None = None) -> DataReport:
    """The report for a data path without training: validate, prepare (cached for the run that follows), report."""
    data_path = data_path or run.config.train_data_path
    try:
        prepared = prepare(run.config, data_path)
    except DataValidationError as exc:
        return invalid_report(run, data_path, exc)
    return data_report(run, prepared, data_path)


def histogram_png(report: DataReport, path: Path) -> Path:
    """Token length histogram, with the context length marked: what truncation will cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for lo, hi, count in report.length_histogram:
        ax.bar(lo, count, width=max(1, hi - lo), align="edge", color="#4C72B0", edgecolor="white")
    ax.axvline(report.context_length, color="#C44E52", linestyle="--", label=f"context length {report.context_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(f"{report.examples} examples, {report.tokens_per_epoch:,} tokens per epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@task(name="resolve-inputs")
def resolve_inputs(record: RunRecord) -> ResolvedRun:
    """The run's inputs checked and resolved once: by fm.create (validate_inputs, the default), which recorded what
    it resolved, else here (a run started from the Prefect UI, a schedule or an event). The tables pinned are
    recorded on the run, so fm.get shows the version read."""
    if record.resolved_model is not None:
        return ResolvedRun(config=record.config, model=record.resolved_model, weights=record.resolved_weights)
    run = resolve_run(record.config)
    runs.update(run.config.name, config=run.config, resolved_model=run.model, resolved_weights=run.weights)
    return run


@task(name="data-report")
def report_data(run: ResolvedRun, prepared: PreparedData) -> DataReport:
    """The report and the run's plan, also shown in the Prefect UI as the flow run's artifact."""
    from prefect.artifacts import create_markdown_artifact

    report = data_report(run, prepared)
    create_markdown_artifact(f"```\n{report.render()}\n```", key="data-report", description=f"data report for {run.config.name}")
    return report

