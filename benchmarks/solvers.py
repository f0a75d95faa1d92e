"""Benchmark: the bilevel solvers on benchmark_bilevel's quadratic instance, against the
peer's published figures (issue #12).

Instance: ``../shared/data/bb_quadratic_n1024.npz`` (n = m = 1024, dims 10/10, exported
from benchmark_bilevel's own generator), problem ``quadratic_sum``, float32 on the CPU,
batch 64, 6,400 outer iterations, 3 seeds. Step 0.1 and outer ratio 1 for every solver
(the peer's setting for SOBA, SABA and SRBA; its other solvers ran its own tuned defaults,
ours run their catalog defaults for every other param — Neumann/HIA terms 10, 10 inner
steps, period one epoch), :data:`SETTINGS`.

For each solver and seed: ``SolverRun`` (the path the ``hpo`` pipeline takes), one
warm-up chunk (compilation out of the clock), then the 6,400 iterations in chunks of
``--chunk``, each timed with ``block`` on the state before the clock stops (benchmark_
bilevel's own timings are dispatch time; see ``docs/benchmarks.md``). Recorded: ‖∇h(x)‖²
at the end from the float64 oracle (the peer's metric), µs per outer iteration, oracle
calls. Prints a Markdown table with the peer's figure and the ratio; ``--json`` writes
the rows.

Usage::

    .venv/bin/python benchmarks/solvers.py                     # all solvers, JAX
    .venv/bin/python benchmarks/solvers.py --solvers soba saba --backend torch
    .venv/bin/python benchmarks/solvers.py --sampling replacement   # i.i.d. draws
    .venv/bin/python benchmarks/solvers.py --solvers soba saba --saba-autodiff  # + SABA
        # without the problem's per-sample hooks (autodiff of the one-row losses), each
        # seed run right after the hooked one
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "bb_quadratic_n1024.npz"

#: ‖∇h‖² after 6,400 iterations, benchmark_bilevel on this instance (../shared/data)
PEER = {"saba": 4.5e-14, "srba": 1.6e-14, "amigo": 3.6e-3, "bsa": 1.4e-2, "mrbo": 2.8e-2,
        "vrbo": 3.0e-2, "sustain": 3.2e-2, "stocbio_solver": 3.8e-2, "ttsa": 5.0e-2,
        "soba": 5.3e-2, "fsla": 6.1e-2}
#: the peer's synchronised time per outer iteration measured here (µs), JAX float32
PEER_US = {"soba": 31.0, "saba": 37.0}
#: per solver: algorithm params for this benchmark (merged over the catalog defaults)
SETTINGS = {name: {"batch_size": 64, "step_size": 0.1, "outer_ratio": 1.0} for name in (
    "soba", "saba", "srba", "fsla", "mrbo", "sustain", "ttsa", "ma_soba", "stocbio_solver",
    "bsa", "amigo", "vrbo", "f2sa", "bome", "pzobo")}
SETTINGS["hoag"] = {"step_size": 0.1, "outer_ratio": 1.0}  # deterministic: full batch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


@contextmanager
def autodiff_rows():
    """SABA without the problem's closed-form per-sample hooks (and the JAX chunk runners'
    caches cleared on the way in and out: they are keyed on the problem's functions)."""
    from hypersweep.algorithms.jax import _solver_core
    from hypersweep.problems.base import ProblemFns

    saved = ProblemFns.has_grad_rows
    _solver_core.run_chunk.clear_cache()
    _solver_core.run_init.clear_cache()
    ProblemFns.has_grad_rows = property(lambda self: False)
    try:
        yield
    finally:
        ProblemFns.has_grad_rows = saved
        _solver_core.run_chunk.clear_cache()
        _solver_core.run_init.clear_cache()


def run_one(name: str, seed: int, *, backend: str, dtype: str, iters: int, chunk: int,
            params: dict) -> dict:
    from hypersweep import problems
    from hypersweep.algorithms.solver_run import SolverRun

    problem = problems.make("quadratic_sum", backend=backend, dtype=dtype, data=str(DATA))
    g0 = problem.exact_hypergradient(problem.initial_hyperparams())
    run = SolverRun(problem, name, seed=seed, params=params)
    run.warm_up(min(chunk, iters))
    seconds = 0.0
    while run.k < iters:
        snap = run.advance(min(chunk, iters - run.k))
        seconds += snap.seconds
    lam = problem.ops.to_numpy(snap.lam).astype(np.float64)
    g = problem.exact_hypergradient(lam)
    return dict(solver=name, seed=seed, backend=backend, dtype=dtype, iters=iters,
                grad_norm_sq=float(g @ g), grad_norm_sq_0=float(g0 @ g0),
                us_per_iter=1e6 * seconds / iters, seconds=seconds,
                oracle_calls=snap.costs["n_oracle_calls"],
                samples=snap.costs["n_samples_touched"], params=params)


def main(argv=None) -> int:
    from hypersweep.algorithms.solvers_common import solver_names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solvers", nargs="*", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=6400)
    ap.add_argument("--chunk", type=int, default=640)
    ap.add_argument("--backend", default="jax", choices=["jax", "torch"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--sampling", default="blocks", choices=["blocks", "replacement"],
                    help="minibatch sampler (default blocks: the peer's, contiguous "
                         "blocks in a fresh order each epoch)")
    ap.add_argument("--saba-autodiff", action="store_true",
                    help="also run SABA without the per-sample hooks (row 'saba/autodiff')")
    args = ap.parse_args(argv)
    if not DATA.exists():
        print(f"benchmarks/solvers.py: {DATA} is absent", file=sys.stderr)
        return 2
    names = args.solvers or solver_names()
    rows = []
    for name in names:
        for seed in range(args.seeds):
            params = dict(SETTINGS[name])
            if "batch_size" in params:
                params["sampling"] = args.sampling
            modes = [name] + (["saba/autodiff"] if name == "saba" and args.saba_autodiff
                              else [])
            for mode in modes:
                with autodiff_rows() if mode.endswith("/autodiff") else nullcontext():
                    row = run_one(name, seed, backend=args.backend, dtype=args.dtype,
                                  iters=args.iters, chunk=args.chunk, params=params)
                row["solver"] = mode
                rows.append(row)
                print(f"  {mode} seed {seed}: ‖∇h‖² {row['grad_norm_sq']:.3g}, "
                      f"{row['us_per_iter']:.1f} µs/it", file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip()
    print(f"\n{datetime.date.today()} · {machine()} · commit {commit} · "
          f"{args.backend} {args.dtype} · {args.iters} iterations · batch 64 · "
          f"sampling {args.sampling} · median of {args.seeds} seeds\n")
    print("| solver | ‖∇h‖² (ours) | peer | ours ÷ peer | µs / iteration | peer µs | "
          "oracle calls |")
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["solver"] for r in rows):
        mine = [r for r in rows if r["solver"] == name]
        g = statistics.median(r["grad_norm_sq"] for r in mine)
        us = statistics.median(r["us_per_iter"] for r in mine)
        peer = PEER.get(name)
        ratio = "" if peer is None else f"{g / peer:.2g}"
        print(f"| {name} | {g:.2g} | {'' if peer is None else f'{peer:.2g}'} | {ratio} | "
              f"{us:.1f} | {PEER_US.get(name, '')} | {mine[0]['oracle_calls']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main())
