"""Running a bilevel solver on a problem: chunks of outer iterations between evaluations.

:class:`SolverRun` is what the ``hpo`` pipeline (and the tests, and
``benchmarks/solvers.py``) drive::

    run = SolverRun(problem, "soba", seed=0, params={"batch_size": 64})
    run.warm_up(n_steps)             # compiles the chunk runner (JAX); state unchanged
    snap = run.advance(n_steps)      # n_steps outer iterations, timed, blocked on the result
    snap.lam, snap.w, snap.v, snap.k, snap.costs, snap.seconds

The backend's ``_solver_core.run_chunk`` runs a chunk: in JAX one compiled ``lax.scan``
over the chunk's iterations (the draws of the whole chunk are one input), in PyTorch a
Python loop. ``seconds`` is the chunk's wall time with ``block`` on the new state before
the clock stops (JAX dispatch is asynchronous), host-side drawing of the minibatch
indices included (it is part of the method's work), evaluation excluded.

Backend-free: the backend modules are imported by name.
"""
from __future__ import annotations

import importlib
import time
from typing import Any, NamedTuple

import numpy as np

from hypersweep.algorithms.common import add_costs, cost_columns, minibatch_sizes
from hypersweep.algorithms.solvers_common import Sampler, calls_costs, make_config


class Snapshot(NamedTuple):
    """The solver after ``k`` outer iterations: λ_k, w_k, v_k (backend arrays; v None
    when the solver has no linear-system variable), the cumulative cost columns, and the
    wall time of the last ``advance``."""

    k: int
    lam: Any
    w: Any
    v: Any
    costs: dict
    seconds: float


class SolverRun:
    """One solver run on ``problem`` (see the module docstring)."""

    def __init__(self, problem, name: str, *, seed: int = 0, params: dict | None = None,
                 lam0=None):
        from hypersweep import algorithms  # the registry (lazy backend import)

        spec = algorithms.spec(name)
        if spec.kind != "solver":
            raise ValueError(f"{name!r} is not a solver (kind {spec.kind!r}). Valid "
                             f"choices: {', '.join(algorithms.names('solver'))}")
        missing = spec.requires - frozenset(problem.capabilities)
        if missing:
            raise ValueError(f"solver {name!r} needs problem capabilities "
                             f"{sorted(missing)}, which {problem.name!r} lacks")
        self.problem, self.name = problem, name
        n_train, n_val = minibatch_sizes(problem)
        self.cfg = make_config(name, params or {}, inner_lr=problem.inner_lr,
                               n_train=n_train, n_val=n_val)
        self.solver = algorithms.get(name, problem.backend)
        self.core = importlib.import_module(
            f"hypersweep.algorithms.{problem.backend}._solver_core")
        self.sampler = Sampler(self.cfg, self.solver.samples(self.cfg), seed)
        lam = problem.as_lam(problem.initial_hyperparams() if lam0 is None else lam0)
        self.state = self.core.run_init(self.solver.init, problem.fns, self.cfg,
                                        problem.arrays, problem.w_init, lam)
        problem.ops.block(self.state.outer)
        self.k = 0
        self.costs = cost_columns(0, 0, 0, 0, 0)

    def _draws(self, start: int, n_steps: int):
        # JAX indexes with int32 (x64 may be off); torch wants int64 tensors on the device
        if self.problem.backend == "torch":
            return [self.problem.ops.asarray(d, "int64")
                    for d in self.sampler.chunk(start, n_steps)]
        return [d.astype(np.int32) for d in self.sampler.chunk(start, n_steps)]

    def _run(self, state, start: int, n_steps: int):
        return self.core.run_chunk(self.solver.step, self.problem.fns, self.cfg, n_steps,
                                   self.problem.arrays, state, self._draws(start, n_steps))

    def warm_up(self, n_steps: int) -> None:
        """Run a chunk of ``n_steps`` from the current state and drop it: JAX compiles the
        chunk runner for that length here, not inside a timed ``advance``."""
        self.problem.ops.block(self._run(self.state, self.k, n_steps).outer)

    def _calls(self, state):
        """The state's cumulative data-dependent calls (None when it keeps none)."""
        calls = getattr(state, "calls", None)
        if calls is None:
            return None
        return np.rint(np.asarray(self.problem.ops.to_numpy(calls), dtype=np.float64)
                       ).astype(np.int64)

    def advance(self, n_steps: int) -> Snapshot:
        """``n_steps`` outer iterations from the current state (timed, blocked).

        Costs: ``counts(cfg, k)`` of each iteration, plus the increase of the state's
        ``calls`` where it keeps one (data-dependent calls; ``solvers_common.CALLS``)."""
        before = self._calls(self.state)
        t0 = time.perf_counter()
        state = self._run(self.state, self.k, n_steps)
        self.problem.ops.block(state.outer)
        seconds = time.perf_counter() - t0
        for k in range(self.k, self.k + n_steps):
            self.costs = add_costs(self.costs, self.solver.counts(self.cfg, k))
        if before is not None:
            self.costs = add_costs(self.costs, calls_costs(self.cfg,
                                                           self._calls(state) - before))
        self.state, self.k = state, self.k + n_steps
        return self.snapshot(seconds)

    def snapshot(self, seconds: float = 0.0) -> Snapshot:
        return Snapshot(k=self.k, lam=self.state.outer, w=self.state.inner,
                        v=getattr(self.state, "adjoint", None), costs=dict(self.costs),
                        seconds=seconds)
