"""Benchmark: cells/s of per-point estimator calls vs one grid call (issue #11).

A *cell* is one (seed, t, K) estimate. Per-point: ``algorithms.get(name, "jax")`` called
once per cell (one compiled function per algorithm, reused; per trajectory bucket for
itd). Grid: ``algorithms.get_grid(name, "jax")`` called once for all the cells, the 8
seeds vmapped and each seed's t values taken from one inner trajectory.

Problem: ``logreg`` with n_train = n_val = 1000, d = 100, λ₀ = log 2e-3 on every feature
(the setting of ``benchmarks/hypergradient.py``), JAX float64 on the CPU, 8 seeds. Cases:

* ``seeds``: t = 1000, one cell per seed (8 cells): only the batching of seeds differs.
* ``t-grid``: t ∈ {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000} per seed (80 cells): the
  grid also runs one trajectory per seed instead of one per cell.

for ``aid_cg`` (K = 100) and ``itd``. Every call is warmed up first (compiles stay out of
the clock), every timed call ends with ``jax.block_until_ready`` on all results, each
timing is the median of ``--repeats`` runs (per-point and grid interleaved, so load
changes hit both alike). Before timing, each grid result is checked against its per-point
call (float64, rel ≤ 1e-10 on hypergrad and w_t, identical costs and solver_iters): the
script exits 1 if one differs.

Usage::

    .venv/bin/python benchmarks/batched_cells.py             # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/batched_cells.py --repeats 9
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

LOGREG = dict(n_train=1000, n_val=1000, n_test=0, n_features=100, lam0=math.log(2e-3))
T_GRID = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
CASES = (("aid_cg", 100), ("itd", None))
RTOL = 1e-10


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    import jax

    return (f"{datetime.date.today()}, nproc {nproc}, {cpu}, Python "
            f"{platform.python_version()}, jax {jax.__version__}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


def check(grid_out, per_out, where: str) -> list[str]:
    bad = []
    for lane, (got_lane, want_lane) in enumerate(zip(grid_out, per_out)):
        for got, want in zip(got_lane, want_lane):
            here = f"{where} seed {lane} t={want.n_inner_grad_evals}"
            if rel(got.hypergrad, want.hypergrad) > RTOL or rel(got.w_t, want.w_t) > RTOL:
                bad.append(f"{here}: hypergrad {rel(got.hypergrad, want.hypergrad):.1e}, "
                           f"w_t {rel(got.w_t, want.w_t):.1e}")
            if got.costs() != want.costs() or got.solver_iters != want.solver_iters:
                bad.append(f"{here}: costs {got.costs()} vs {want.costs()}, solver_iters "
                           f"{got.solver_iters} vs {want.solver_iters}")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args(argv)

    import jax

    from hypersweep import algorithms, problems

    print(f"machine: {machine()}; load average at start {load()}", flush=True)
    instances = [problems.make("logreg", backend="jax", seed=s, dtype="float64", **LOGREG)
                 for s in range(args.seeds)]
    lams = [p.as_lam(p.initial_hyperparams()) for p in instances]
    rows, failures = [], []
    for case, ts in (("seeds", (1000,)), ("t-grid", T_GRID)):
        for name, K in CASES:
            per_point = algorithms.get(name, "jax")
            grid = algorithms.get_grid(name, "jax")
            points = [[(t, K) for t in ts] for _ in instances]

            def run_per_point():
                out = [[per_point(p, lam, t=t, K=K) for t, K in lane]
                       for p, lam, lane in zip(instances, lams, points)]
                jax.block_until_ready([r.hypergrad for lane in out for r in lane])
                return out

            def run_grid():
                out = grid(instances, lams, points=points)
                jax.block_until_ready([r.hypergrad for lane in out for r in lane])
                return out

            failures += check(run_grid(), run_per_point(), f"{case} {name}")  # + warm-up
            times: dict[str, list[float]] = {"per": [], "grid": []}
            for _ in range(args.repeats):
                for key, call in (("per", run_per_point), ("grid", run_grid)):
                    start = time.perf_counter()
                    call()
                    times[key].append(time.perf_counter() - start)
            cells = sum(len(lane) for lane in points)
            per_s, grid_s = (statistics.median(times[k]) for k in ("per", "grid"))
            rows.append((case, name, "" if K is None else K, cells, per_s, grid_s))
            print(f"{case:7s} {name:7s} cells {cells:3d}: per-point {per_s * 1e3:7.1f} ms, "
                  f"grid {grid_s * 1e3:7.1f} ms, ratio {per_s / grid_s:.2f} "
                  f"(load {load()})", flush=True)
    print(f"\nload average at end {load()}\n")
    print("| case | algorithm | K | cells | per-point: ms (cells/s) | grid: ms (cells/s) "
          "| grid ÷ per-point cells/s |")
    print("|---|---|---|---|---|---|---|")
    for case, name, K, cells, per_s, grid_s in rows:
        print(f"| {case} | {name} | {K} | {cells} | {per_s * 1e3:.1f} ({cells / per_s:.0f}) "
              f"| {grid_s * 1e3:.1f} ({cells / grid_s:.0f}) | **{per_s / grid_s:.2f}×** |")
    if failures:
        print("\ngrid results differ from the per-point calls:\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 1
    print("\nevery grid result equals its per-point call (rel ≤ 1e-10, identical costs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
