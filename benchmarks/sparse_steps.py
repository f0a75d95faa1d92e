"""Benchmark: one outer step of stocbio (minibatch) against aid_cg (full batch) on sparse data.

Problem: ``sparse_logreg`` on the 20-news-shaped generator (default n_train = 11,314,
d = 130,107, density 0.1 %, one λ per feature), float64. One timed call is one whole
hypergradient at λ₀: stocbio with t minibatch SGD steps, K Neumann terms and batch b;
aid_cg with t full-batch gradient steps and K CG iterations. SOBA's outer step (one
minibatch gradient, HVP, cross product and update at batch b) is timed too, per step over
a chunk of ``--soba-steps``. Every function is called once first (compiled in JAX), then
the timed calls alternate between the methods so drifting machine load hits them alike;
each clock stops after the result is blocked on. Printed: the best and median per method
and the ratio aid_cg / stocbio (the issue's target: ≥ 20 at batch 64).

Usage::

    .venv/bin/python benchmarks/sparse_steps.py                   # both backends
    .venv/bin/python benchmarks/sparse_steps.py --backends jax --t 10 --K 10 --reps 5
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def _timed(fn, block) -> float:
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["jax", "torch"])
    ap.add_argument("--n-train", type=int, default=11314)
    ap.add_argument("--n-features", type=int, default=130107)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--t", type=int, default=10)
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--soba-steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)

    import torch

    from hypersweep import algorithms, problems
    from hypersweep.algorithms.solver_run import SolverRun

    torch.set_num_threads(args.torch_threads)  # as inside a Ray actor
    records = {}
    for backend in args.backends:
        p = problems.make("sparse_logreg", backend=backend, seed=0, dtype="float64",
                          n_train=args.n_train, n_val=args.n_train // 3, n_test=0,
                          n_features=args.n_features, density=args.density)
        lam = p.as_lam(p.initial_hyperparams())
        block = p.ops.block
        stocbio, aid_cg = algorithms.get("stocbio", backend), algorithms.get("aid_cg", backend)
        seeds = iter(range(10**6))
        calls = {
            "stocbio": lambda: stocbio(p, lam, t=args.t, K=args.K, batch_size=args.batch,
                                       seed=next(seeds)).hypergrad,
            "aid_cg": lambda: aid_cg(p, lam, t=args.t, K=args.K).hypergrad,
        }
        soba = SolverRun(p, "soba", seed=0, params={"batch_size": args.batch})
        soba.advance(args.soba_steps)  # compiles the chunk
        calls["soba"] = lambda: soba.advance(args.soba_steps).lam
        first = {name: _timed(fn, block) for name, fn in calls.items()}
        times = {name: [] for name in calls}
        for _ in range(args.reps):
            for name, fn in calls.items():
                times[name].append(_timed(fn, block))
        times["soba"] = [s / args.soba_steps for s in times["soba"]]
        for name, ts in times.items():
            records[backend, name] = dict(best_ms=min(ts) * 1e3,
                                          median_ms=statistics.median(ts) * 1e3,
                                          first_s=first[name])
            print(f"[{backend} {name}: best {min(ts) * 1e3:.1f} ms]", file=sys.stderr,
                  flush=True)
    text = render(records, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


def render(records, args) -> str:
    lines = [
        f"## sparse_logreg, one outer step: stocbio b = {args.batch} vs aid_cg full batch, "
        f"t = {args.t}, K = {args.K}; n_train {args.n_train}, d {args.n_features}, "
        f"density {args.density}, float64",
        "",
        f"Command: `.venv/bin/python benchmarks/sparse_steps.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}; torch {args.torch_threads} intra-op thread(s).",
        "",
        "| backend | stocbio best / median ms | aid_cg best / median ms | aid_cg ÷ stocbio "
        "(best) | soba per step, best ms |",
        "|---|---|---|---|---|",
    ]
    for backend in args.backends:
        s, a, o = (records[backend, m] for m in ("stocbio", "aid_cg", "soba"))
        lines.append(f"| {backend} | {s['best_ms']:.1f} / {s['median_ms']:.1f} | "
                     f"{a['best_ms']:.1f} / {a['median_ms']:.1f} | "
                     f"{a['best_ms'] / s['best_ms']:.1f}× | {o['best_ms']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
