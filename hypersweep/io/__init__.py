"""What a study leaves on disk and in MLflow: the Parquet schemas, parts and readers
(:mod:`.parquet`, :mod:`.schema`), the output folder's lock (:mod:`.lock`) and the MLflow
view of the results (:mod:`.tracking`: URI rule, grouping, logger; :mod:`.tracking_sync`:
the writer thread and the backfill). Driver-side only; never imports torch or jax."""
