"""How the estimator tests call an estimator (tests/test_hypergradients.py, test_parity.py)."""
from __future__ import annotations

from hypersweep import algorithms

FULL_BATCH = 10 ** 6   # a batch_size larger than every split: no sampling


def run(name: str, problem, lam, **kwargs):
    """``name`` on ``problem`` at ``lam``; K is dropped for an algorithm that ignores it."""
    if not algorithms.spec(name).uses_K:
        kwargs.pop("K", None)
    return algorithms.get(name, backend=problem.backend)(problem, lam, **kwargs)


def full_batch(algo: str) -> dict:
    """Minibatch estimators (stocbio) with a batch larger than every split: deterministic."""
    return {"batch_size": FULL_BATCH} if "batch_size" in algorithms.spec(algo).params else {}
