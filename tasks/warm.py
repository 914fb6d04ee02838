"""What the fork server of the stages' programs imports once (tessera.core.forkserver): one warm process per home forks
both the training processes' launcher (tasks/train/standalone.py, which forks the ranks of tasks/train/worker.py from
itself: torch, its distributed checkpointing, and transformers' model, tokenizer and generation code, which it
imports as it loads the model) and the register stage's program (tasks/log_model.py: MLflow's stores and
transformers flavor, which imports transformers' pipelines)."""

PROGRAM_IMPORTS = (
    "tasks.train.standalone", "tasks.train.worker", "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto", "transformers.models.llama.modeling_llama",
    "transformers.tokenization_utils_tokenizers", "transformers.generation.utils", "safetensors.torch", "jinja2",
    "tasks.log_model", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.transformers", "transformers.pipelines",
)
