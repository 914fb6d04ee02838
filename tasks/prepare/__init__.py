"""Stage: prepare. `stage` (the Prefect task) reads a run's sources, checks every record, tokenizes with loss
masks and packs into blocks, cached by content; `spark` does the same on Spark for large inputs."""
