"""hypersweep: studies of hypergradient algorithms against black-box search, on Ray.

Public API (importing it loads neither torch nor jax; backends load on use)::

    from hypersweep import problems, algorithms
    p = problems.make("logreg", backend="jax", seed=0, dtype="float64")
    res = algorithms.get("aid_cg", backend="jax")(p, p.initial_hyperparams(), t=100, K=20)
    problems.names(), algorithms.names()

Studies: ``hypersweep plan|run|status|report|sync-mlflow|regress`` (see ``hypersweep -h``).
"""
__version__ = "0.1.0"

from hypersweep import algorithms, problems  # noqa: E402  (pure catalogs; no torch/jax)

__all__ = ["problems", "algorithms", "__version__"]
