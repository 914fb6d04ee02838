"""Stage: evaluate and promote (the retrain flow's gate), and what keeps retrains of one model orderly.

- Plan: what version of the source a retrain would read (the Delta version, a file's or folder's content hash, as
  the register stage tags it) and a hash of its configuration; a version registered from both already ends the
  retrain early (idempotent), and a source older than the champion's is refused (in order). `force` overrides both.
- Held out: the eval data must not be the training data (the same path, content or table version): refused up front.
- Evaluate: the new version and the incumbent (the `@champion`, else the weights training started from) are
  scored on the same pinned eval set, tokenized and packed by the prepare stage, with the trainer's loss code; per
  trained token when both read it as the same tokens, else per byte of the trained text (tokenizers differ).
- Decide: promote when the new version's metric (lower is better) is below the incumbent's by the margin;
  otherwise the champion stays and the new version is tagged with why it lost and both values. The tags come
  first, then @champion moves, then `promotion`, last: it marks the version decided, so a retrain that dies on
  the way leaves a version that is neither promoted nor done (the next retrain of that data decides).
- One at a time per model: `model_lock` holds a Prefect global concurrency limit named after the registered model.

`stage` holds the Prefect tasks the retrain flow calls (plan_retrain, promote_model); beside it: `decision` (the
gate, pure), `plan` (idempotence and order, pure), `scoring` (both models on the eval set), `champion` (the alias
and the decision written on the version), `lock` (one retrain per model), `run_record` (the flow's state hooks),
`faults` (test-only fault injection)."""
