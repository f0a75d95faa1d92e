"""Benchmark: does one stocBiO call cost O(batch), independent of the training-set size?

Problem: synthetic ``logreg``, d = 20, n_val = 1000, float64; only n_train varies. Each
timed call is one complete ``stocbio`` hypergradient (t minibatch SGD steps from w = 0, one
validation batch, K Hessian batches, one cross-term batch) at λ₀, batch 64, t = 200,
K = 10. Every (backend, n_train) is called once first (JAX compiles once per n_train:
the training-set size is a static shape), then the timed calls are interleaved across the
sizes, so drifting machine load hits every size alike; the clock stops after the result is
blocked on. Reported: median (and min) of the timed calls and the ratios of the largest
sizes to the smallest, per backend. With an O(batch) sampler the ratios stay near 1.

Usage::

    .venv/bin/python benchmarks/stochastic_cost.py --reps 31
    .venv/bin/python benchmarks/stochastic_cost.py --reps 31 --cpus 1   # one CPU: XLA:CPU
                                       # then splits no gather across threads
    .venv/bin/python benchmarks/stochastic_cost.py --sizes 2000 64000 --reps 3 --backends jax
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from hypersweep import algorithms, problems


def _call(backend, problem, lam, *, t, K, batch, seed):
    estimate = algorithms.get("stocbio", backend)(problem, lam, t=t, K=K, seed=seed,
                                                   batch_size=batch)
    problem.ops.block(estimate.hypergrad)
    return estimate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 16000, 64000, 128000])
    ap.add_argument("--backends", nargs="+", default=["jax", "torch"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--t", type=int, default=200)
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--n-features", type=int, default=20)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=7, help="timed calls per size (>= 5)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=None,
                    help="pin the process to its first N CPUs before jax/torch load "
                         "(default: no pinning)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    if args.cpus is not None:
        # Before jax loads: XLA:CPU sizes its thread pool and its per-op thread split
        # from the CPUs the process may run on.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])

    import torch

    # One intra-op thread, as cells run inside Ray actors (see benchmarks/hypergradient.py).
    torch.set_num_threads(args.torch_threads)
    sizes = sorted(args.sizes)
    records = {}
    for backend in args.backends:
        cases = {}
        for n in sizes:
            problem = problems.make("logreg", backend=backend, seed=0, dtype="float64",
                                    n_train=n, n_val=args.n_val, n_test=0,
                                    n_features=args.n_features)
            lam = problem.as_lam(problem.initial_hyperparams())
            t0 = time.perf_counter()
            _call(backend, problem, lam, t=args.t, K=args.K, batch=args.batch, seed=0)
            cases[n] = (problem, lam, time.perf_counter() - t0)
        times = {n: [] for n in sizes}
        for rep in range(args.reps):
            for n in sizes:
                problem, lam, _ = cases[n]
                t0 = time.perf_counter()
                _call(backend, problem, lam, t=args.t, K=args.K, batch=args.batch,
                      seed=rep + 1)
                times[n].append(time.perf_counter() - t0)
        for n in sizes:
            median = statistics.median(times[n])
            records[backend, n] = dict(median_ms=median * 1e3, min_ms=min(times[n]) * 1e3,
                                       first_s=cases[n][2], reps=len(times[n]))
            print(f"[{backend} n_train={n}: {median * 1e3:.2f} ms]", file=sys.stderr,
                  flush=True)
    text = render(records, sizes, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


def render(records, sizes, args) -> str:
    lines = [
        f"## stocbio cost vs n_train: logreg d = {args.n_features}, n_val = {args.n_val}, "
        f"batch {args.batch}, t = {args.t}, K = {args.K}, float64",
        "",
        f"Command: `.venv/bin/python benchmarks/stochastic_cost.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}; torch {args.torch_threads} intra-op thread(s); "
        f"process on {len(os.sched_getaffinity(0))} CPU(s).",
        "",
        "| backend | n_train | median ms | min ms | first call s | timed calls |",
        "|---|---|---|---|---|---|",
    ]
    for backend in args.backends:
        for n in sizes:
            r = records[backend, n]
            lines.append(f"| {backend} | {n} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                         f"{r['first_s']:.2f} | {r['reps']} |")
    lines += ["", f"Time ratios to n_train = {sizes[0]}, of the medians (of the minima):", ""]
    for backend in args.backends:
        first = records[backend, sizes[0]]
        ratios = ", ".join(
            f"{n}/{sizes[0]} = {records[backend, n]['median_ms'] / first['median_ms']:.2f} "
            f"({records[backend, n]['min_ms'] / first['min_ms']:.2f})" for n in sizes[1:])
        lines.append(f"- {backend}: {ratios}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
