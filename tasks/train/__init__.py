"""Stage: train. `stage` (the Prefect task) plans the run and starts `worker` (the loop): `standalone` forks its
processes on one node, torchrun starts them over several (`nodes`); the loop's mechanisms live beside it: `data`
(batched, prefetched reads), `loss` (chunked), `precision`, `report` (MLflow, events and progress, silent off rank
0). Nothing here imports Prefect but `stage`."""
