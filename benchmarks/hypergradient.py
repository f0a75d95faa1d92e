"""Benchmark: time, compile time, memory and error of one hypergradient, per algorithm and backend.

Problem: ``logreg`` with n_train = n_val = 1000, d = 100, one penalty per feature
(λ₀ = 2e-3 on every feature, the setting of ``../shared/notes/peer-performance.md``), float32.
Each timed call computes one *complete* hypergradient at λ₀: t inner GD steps from w = 0
plus the hypergradient. Wall time is the median of repeated calls after a warm-up call;
for JAX the first call's extra time is reported as compile time. Peak memory is the peak
extra glibc heap during one call (``pipelines._measure.PeakHeap``). Error is
‖ĝ − ∇F‖/‖∇F‖ against the float64 Newton oracle.

Peers, side by side in the same run when the ``bench`` extra is installed
(``pip install -e '.[bench]'``): jaxopt ``custom_root`` + CG, torchopt implicit
``custom_root`` + CG, on the same losses and the same inner solver.

Usage::

    .venv/bin/python benchmarks/hypergradient.py                 # full grid, ~10 min
    .venv/bin/python benchmarks/hypergradient.py --t 10 100 --quick
    .venv/bin/python benchmarks/hypergradient.py --out docs/benchmarks_hypergradient.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from functools import partial

import numpy as np

from hypersweep import algorithms, problems
from hypersweep.pipelines._measure import PeakHeap

LOGREG = dict(n_train=1000, n_val=1000, n_test=0, n_features=100, lam0=math.log(2e-3))


def _median_time(call, block, *, min_time: float, min_reps: int, max_reps: int):
    """Warm-up call (its time returned as ``first``) then repeats until ``min_time``."""
    t0 = time.perf_counter()
    out = call()
    block(out)
    first = time.perf_counter() - t0
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time
                                    and len(times) < max_reps):
        t0 = time.perf_counter()
        out = call()
        block(out)
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times), len(times)


def _peak_mb(call, block) -> float | None:
    with PeakHeap() as mem:
        block(call())
    return mem.peak_mb


# ----------------------------------------------------------------------------- peers
def jaxopt_cg(problem, lam, t: int, K: int):
    """jaxopt.implicit_diff.custom_root + linear_solve.solve_cg on our inner GD solver."""
    import jax
    from jax import lax
    from jaxopt.implicit_diff import custom_root
    from jaxopt.linear_solve import solve_cg

    fns, eta = problem.fns, problem.inner_lr

    def optimality(w, lam_, arrays):
        return jax.grad(fns.inner_loss)(w, lam_, arrays)

    @partial(jax.jit, static_argnums=(3, 4))
    def hypergrad(w0, lam_, arrays, t_, K_):
        @custom_root(optimality, solve=partial(solve_cg, maxiter=K_, tol=1e-10))
        def inner(w_init, lam__, arrays_):
            return lax.fori_loop(0, t_, lambda i, w: w - eta * optimality(w, lam__, arrays_),
                                 w_init)

        return jax.grad(lambda l: fns.outer_loss(inner(w0, l, arrays), l, arrays))(lam_)

    return lambda: hypergrad(problem.w_init, lam, problem.arrays, t, K)


def torchopt_cg(problem, lam, t: int, K: int, *, autograd_inner: bool = False):
    """torchopt.diff.implicit.custom_root + linear_solve.solve_cg around an inner GD solver.

    ``autograd_inner=False``: our analytic no-grad steps (isolates the implicit part);
    ``True``: the inner loop written the usual way, one autograd call of ∇_w L_in per step.
    The optimality condition is the analytic gradient in both.
    """
    import torch
    import torchopt

    fns, eta, arrays = problem.fns, problem.inner_lr, problem.arrays

    def optimality(w, lam_):
        return fns.inner_grad(w, lam_, arrays)

    def autograd_step(w, lam_):
        with torch.enable_grad():
            w = w.detach().requires_grad_(True)
            return torch.autograd.grad(fns.inner_loss(w, lam_.detach(), arrays), w)[0]

    gradient = autograd_step if autograd_inner else optimality

    @torchopt.diff.implicit.custom_root(
        optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=K, rtol=1e-10))
    def inner(w_init, lam_):
        w = w_init.detach()
        with torch.no_grad():
            for _ in range(t):
                w = w - eta * gradient(w, lam_)
        return w

    def call():
        lam_ = lam.detach().clone().requires_grad_(True)
        w = inner(problem.w_init.clone(), lam_)
        return torch.autograd.grad(fns.outer_loss(w, lam_, arrays), lam_)[0]

    return call


# ----------------------------------------------------------------------------- main
def cases(ts, include_forward: bool):
    for name in algorithms.names(kind="estimator"):
        spec = algorithms.spec(name)
        if name in ("exact",):
            continue
        for t in ts:
            if name == "itd_forward" and (not include_forward or t > 100):
                continue  # forward mode costs dim λ = 100 jvps per step
            Ks = sorted({10, t}) if spec.uses_K else [None]
            for K in Ks:
                yield name, t, K


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--t", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--backends", nargs="+", default=["jax", "torch"])
    ap.add_argument("--algorithms", nargs="*", default=None)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-forward", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    ap.add_argument("--jsonl", default=None, help="append raw records here")
    args = ap.parse_args(argv)
    min_reps, max_reps = (2, 5) if args.quick else (5, 200)
    min_time = 0.3 if args.quick else args.min_time

    import torch

    # One intra-op thread, as in Ray actors (OMP_NUM_THREADS=1). With 2 threads on this
    # 2-core machine tiny elementwise ops (exp of a 100-vector) took 53 µs instead of 1.2 µs
    # (OpenMP wake-ups), which made every torch method 2-10x slower and very noisy.
    torch.set_num_threads(args.torch_threads)
    records = []
    oracle = {}
    for backend in args.backends:
        problem = problems.make("logreg", backend=backend, seed=0, dtype="float32", **LOGREG)
        lam0 = problem.initial_hyperparams()
        if "g" not in oracle:
            oracle["g"] = problem.exact_hypergradient(lam0)
        g_star = oracle["g"]
        lam = problem.as_lam(lam0)
        block = problem.ops.block
        runs = []
        for name, t, K in cases(args.t, not args.no_forward):
            if args.algorithms and name not in args.algorithms:
                continue
            fn = algorithms.get(name, backend)
            runs.append((f"hypersweep.{name}", name, t, K,
                         lambda fn=fn, t=t, K=K: fn(problem, lam, t=t, K=K, seed=0).hypergrad))
        peers = {"jax": [("jaxopt.custom_root_cg", jaxopt_cg)],
                 "torch": [("torchopt.implicit_cg", torchopt_cg),
                           ("torchopt.implicit_cg_autograd_inner",
                            partial(torchopt_cg, autograd_inner=True))]}
        try:
            __import__("jaxopt" if backend == "jax" else "torchopt")
            for label, make_peer in peers[backend]:
                for t in args.t:
                    for K in sorted({10, t}):
                        runs.append((label, "aid_cg", t, K, make_peer(problem, lam, t, K)))
        except ImportError:
            print(f"[{backend} peer not installed: pip install -e '.[bench]']", file=sys.stderr)
        for label, name, t, K, call in runs:
            try:
                out, first, med, n = _median_time(call, block, min_time=min_time,
                                                  min_reps=min_reps, max_reps=max_reps)
                g = problem.ops.to_numpy(out)
                err = float(np.linalg.norm(g - g_star) / np.linalg.norm(g_star))
                mem = (_peak_mb(call, block)
                       if name in ("itd", "aid_cg") and label.startswith("hypersweep") else None)
                rec = dict(backend=backend, method=label, algorithm=name, t=t, K=K,
                           median_ms=med * 1e3, compile_s=max(0.0, first - med), reps=n,
                           rel_error=err, peak_heap_mb=mem)
            except Exception as exc:  # a failing case is reported, the benchmark goes on
                rec = dict(backend=backend, method=label, algorithm=name, t=t, K=K,
                           error=f"{type(exc).__name__}: {exc}")
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    text = render(records, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return 0


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def render(records, args) -> str:
    lines = [
        "## Hypergradient benchmark: logreg n_train = n_val = 1000, d = 100, per-feature λ, float32",
        "",
        f"Command: `.venv/bin/python benchmarks/hypergradient.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}; torch {args.torch_threads} intra-op thread(s).",
        "",
        "| backend | method | t | K | median ms | compile s | rel. error | peak heap MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['method']} | {r['t']} | {_fmt(r['K'], '')} | "
                         f"failed: {r['error'][:80]} | | | |")
            continue
        compile_s = r["compile_s"] if r["backend"] == "jax" else None
        lines.append(
            f"| {r['backend']} | {r['method']} | {r['t']} | {_fmt(r['K'], '')} | "
            f"{r['median_ms']:.2f} | {_fmt(compile_s, '.2f')} | {r['rel_error']:.1e} | "
            f"{_fmt(r['peak_heap_mb'], '.1f')} |")
    # ratios against the peers at t = K = max t
    tmax = max(args.t)
    by = {(r["backend"], r["method"], r["t"], r["K"]): r for r in records if "error" not in r}
    lines += ["", f"Ratios at t = K = {tmax} (AID-CG, same run):", ""]
    for backend, peer in (("jax", "jaxopt.custom_root_cg"), ("torch", "torchopt.implicit_cg"),
                          ("torch", "torchopt.implicit_cg_autograd_inner")):
        ours = by.get((backend, "hypersweep.aid_cg", tmax, tmax))
        theirs = by.get((backend, peer, tmax, tmax))
        if ours and theirs:
            lines.append(f"- {backend}: hypersweep aid_cg {ours['median_ms']:.1f} ms "
                         f"(err {ours['rel_error']:.1e}) vs {peer} {theirs['median_ms']:.1f} ms "
                         f"(err {theirs['rel_error']:.1e}): ratio ours/peer = "
                         f"{ours['median_ms'] / theirs['median_ms']:.2f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
