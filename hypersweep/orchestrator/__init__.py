"""Where and when cells run: study specs, Ray actors, the driver, Parquet and MLflow sinks.

Nothing in this package imports torch or jax (a test checks it in a subprocess).
"""
