"""Stage: prepare. `stage` (the Prefect task) reads a run's sources, checks every record, tokenizes with loss
masks and packs into blocks, cached by content; `spark` does the same on Spark for large inputs. Below both:
`tokenizing` (records to token ids and loss masks), `packing` (examples into rows), `rows` (the rows in memory
and on disk: the one writer and the one reader, which the trainer uses too) and `pipeline` (records to rows in
bounded pieces, the part both engines run)."""
