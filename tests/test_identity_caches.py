"""Per-process caches are keyed by identities, never by ``id()``: tested at a scale larger
than every cache, in one process and through a real Ray sweep.

The failure this guards against: a bounded cache of problem instances evicts one, CPython
hands its id to the next instance built (another seed), and an oracle cache keyed by
``id(problem)`` then scores that instance against the evicted one's ∇F (relative errors of
0.04–2.9 on converged cells). Here every cell converges (aid_exact at t = 200 on tiny,
well-conditioned instances: true relative error ≤ 1e-14), so any stored error above 1e-8
is a stale oracle; each cell is also checked against an oracle built afresh in the test.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from hypersweep import problems
from hypersweep.orchestrator.cell import Cell, canonical_json, run_cell
from hypersweep.pipelines import common

PROBLEMS = {"ridge": dict(n_features=3, n_train=20, n_val=10),
            "logreg": dict(n_features=3, n_train=20, n_val=10, n_test=10)}
BACKENDS = ("jax", "torch")
T = 200
CONVERGED = 1e-8


def _n_seeds() -> int:
    """Enough seeds that the instances outnumber the instance cache and the (instance, λ)
    pairs outnumber the oracle cache, with room to spare."""
    per_seed = len(PROBLEMS)
    return max(common.PROBLEM_CACHE_SIZE, common.ORACLE_CACHE_SIZE) // per_seed + 24


def _cells(study: str, seeds: int) -> list[Cell]:
    return [Cell(study=study, pipeline="hypergradient_error", problem=name,
                 algorithm="aid_exact", backend=backend, t=T, K=None, seed=seed,
                 problem_params=canonical_json(params))
            for seed in range(seeds) for name, params in PROBLEMS.items()
            for backend in BACKENDS]


def _fresh_norm(row: dict) -> float:
    """‖∇F(λ₀)‖ of the row's instance, built from scratch (no cache involved)."""
    problem = problems.make(row["problem"], backend="torch", seed=int(row["seed"]),
                            dtype="float64", **json.loads(row["problem_params"]))
    return float(np.linalg.norm(problem.exact_hypergradient(problem.initial_hyperparams())))


def _check(rows: list[dict]) -> None:
    assert rows and all(r["status"] == "ok" for r in rows), [
        r["error_message"] for r in rows if r["status"] != "ok"][:3]
    stale = [(r["cell_id"], r["hypergrad_rel_error"]) for r in rows
             if not r["hypergrad_rel_error"] <= CONVERGED]
    assert not stale, f"{len(stale)} of {len(rows)} converged cells scored against a " \
                      f"wrong oracle: {stale[:5]}"
    for r in rows:
        stored = json.loads(r["extra"])["exact_hypergrad_norm"]
        assert stored == pytest.approx(_fresh_norm(r), rel=1e-12, abs=0), r["cell_id"]


def test_more_instances_than_any_cache_in_one_process():
    seeds = _n_seeds()
    cells = _cells("identity-in-process", seeds)
    assert len({(c.problem, c.seed, c.backend) for c in cells}) > common.PROBLEM_CACHE_SIZE
    assert len({(c.problem, c.seed) for c in cells}) > common.ORACLE_CACHE_SIZE
    rows = [run_cell(cell)[0] for cell in cells]
    _check(rows)
    assert len(common.ORACLES) <= common.ORACLE_CACHE_SIZE  # still bounded
    assert len(common.WARM_UPS) <= common.WARM_UP_CACHE_SIZE
    assert common._problem.cache_info().currsize <= common.PROBLEM_CACHE_SIZE


def test_oracle_key_is_the_instance_identity():
    a = problems.make("ridge", backend="jax", seed=1, dtype="float64", **PROBLEMS["ridge"])
    b = problems.make("ridge", backend="torch", seed=1, dtype="float32", **PROBLEMS["ridge"])
    c = problems.make("ridge", backend="jax", seed=2, dtype="float64", **PROBLEMS["ridge"])
    lam = a.initial_hyperparams()
    assert common.oracle_key(a, lam) == common.oracle_key(b, lam)  # same data, same oracle
    assert common.oracle_key(a, lam) != common.oracle_key(c, lam)
    assert common.oracle_key(a, lam) != common.oracle_key(a, lam + 1.0)


@pytest.mark.ray
@pytest.mark.slow
def test_more_instances_than_any_cache_through_a_real_ray_sweep(ray_session, tmp_path):
    """The same through the driver and Ray actors (2 actors: each one sees more instances
    than its caches hold), read back from Parquet."""
    from hypersweep.io import parquet
    from hypersweep.orchestrator import driver
    from hypersweep.orchestrator.spec import parse_study

    seeds = _n_seeds() + 16  # two actors share the cells: each sees > 40 instances
    problems_yaml = "\n".join(f"  - name: {name}\n    params: {json.dumps(params)}"
                              for name, params in PROBLEMS.items())
    study = parse_study(f"""
study: identity-ray
pipeline: hypergradient_error
backend: [jax, torch]
dtype: float64
problems:
{problems_yaml}
algorithms: [aid_exact]
t: [{T}]
seeds: {seeds}
resources: {{num_cpus: 1}}
output: {tmp_path / 'out'}
mlflow: {{enabled: false}}
""")
    summary = driver.run_study(study, quiet=True)
    assert summary["study_counts"]["ok"] == seeds * len(PROBLEMS) * len(BACKENDS)
    rows = parquet.read_results(tmp_path / "out").to_pylist()
    assert len(rows) == seeds * len(PROBLEMS) * len(BACKENDS)
    _check(rows)
