"""Stage: train. `stage` (the Prefect task) plans the run and starts `worker` (the loop) under torchrun;
the loop's mechanisms live beside it: `data` (batched, prefetched reads), `loss` (chunked), `precision`,
`report` (MLflow, events and progress, silent off rank 0). Nothing here imports Prefect but `stage`."""
