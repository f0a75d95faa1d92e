"""Backend-free pieces of the bilevel solvers (``kind="solver"``): the interface, the
settings, the one minibatch sampler and the counting convention.

A solver is an optax-style pair of pure functions with an explicit NamedTuple state, the
same names and signatures in ``hypersweep.algorithms.jax.solvers_*`` and
``hypersweep.algorithms.torch.solvers_*``::

    state = solver.init(oracles, w0, lam0, cfg)          # inner, adjoint, outer, memories
    state = solver.step(oracles, state, draws, cfg)      # one outer iteration

* ``oracles``: the backend's ``_solver_core.Oracles(fns, arrays)`` — minibatch gradients,
  Hessian-vector and cross products of the problem's ``inner_loss_batch`` /
  ``outer_loss_batch`` over row indices (the full split when ``idx`` is ``oracles.
  all_train`` / ``all_val``).
* ``cfg``: a :class:`SolverConfig` (hashable; a static argument of the JAX chunk runner).
* ``draws``: a tuple of integer index arrays, one per entry of the solver's
  ``samples(cfg)`` (``"train"`` or ``"val"``), each of ``cfg.b_train`` / ``cfg.b_val``
  rows, drawn by :class:`Sampler` on the host. A step never draws its own randomness, so
  the JAX and PyTorch trajectories see the same minibatch sequence (parity), and a step
  costs O(batch) whatever n.

The sampler (the solver param ``sampling``): with ``replacement`` (the default) every
minibatch is ``batch_size`` row indices drawn i.i.d. uniformly *with replacement* from its
split (numpy's PCG64, seeded per (cell seed, stream, block of :data:`DRAW_BLOCK` steps) by
:func:`~hypersweep.seeding.derive_seed`, so the sequence does not depend on how a run is
cut into chunks); with ``blocks`` each stream cycles through the split's ⌊n/b⌋ contiguous
blocks of ``batch_size`` rows, in a fresh random order (and a random offset, so that no row
is left out for good) each epoch — benchmark_bilevel's sampler: without replacement within
an epoch, hence a lower variance. A split with at most ``batch_size`` rows is used whole,
in order (no draw): the deterministic limit.

Counting (``docs/costs.md``): each solver declares ``counts(cfg, k)``, the oracle calls of
its outer iteration k (0-based; periodic full-batch refreshes make it depend on k), in
the cost-column convention: ∇_w L_in, ∇²_ww L_in·v, ∇²_λw L_in·v, (∇_w L_out, ∇_λ L_out)
— one unit per call whatever the batch — and the rows read. A ∇_λ L_in (first-order
methods) counts as a cross product.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from hypersweep.algorithms.catalog import ALGORITHMS
from hypersweep.algorithms.common import cost_columns
from hypersweep.algorithms.params import check_algorithm_params
from hypersweep.seeding import derive_seed

#: draws are generated in blocks of this many outer iterations (one generator each)
DRAW_BLOCK = 256
#: the minibatch samplers (solver param ``sampling``), see :class:`Sampler`
SAMPLINGS = ("replacement", "blocks")
#: ``blocks``: a split of at most this many blocks is shuffled uniformly each epoch
SHUFFLE_MAX_BLOCKS = 1 << 16
#: ``blocks``: the epochs of about this many steps share one generator (drawn at once)
EPOCH_GROUP_STEPS = 4096
SPLITS = ("train", "val")


def solver_names() -> list[str]:
    """The solvers of the catalog (``kind="solver"``), in registration order."""
    return [s.name for s in ALGORITHMS if s.kind == "solver"]


class Solver(NamedTuple):
    """A bilevel solver: ``init``/``step`` (backend) + ``samples``/``counts`` (backend-free).

    ``samples(cfg) -> tuple[str, ...]``: the minibatches one step reads, in order
    (``"train"``/``"val"``). ``counts(cfg, k) -> dict``: the cost columns of outer
    iteration k (:func:`step_costs` builds them).
    """

    init: Callable[..., Any]
    step: Callable[..., Any]
    samples: Callable[["SolverConfig"], tuple]
    counts: Callable[["SolverConfig", int], dict]


class SolverConfig(NamedTuple):
    """The settings of one solver run (hashable: the JAX chunk runner's static argument).

    ``inner_step`` α (step on w), ``outer_step`` β (step on λ), ``adjoint_step`` γ (step
    on the linear-system variable v): from the solver's ``step_size`` (None: the problem's
    η = 1/L), ``outer_ratio`` (β = α / outer_ratio) and ``adjoint_ratio`` where it has
    them. ``n_train``/``n_val``: split sizes; ``b_train``/``b_val``: rows per minibatch
    (min(batch_size, n)). ``params``: every solver param after merging, as sorted
    (key, value) pairs; read one with :meth:`get`.
    """

    name: str
    inner_step: float
    outer_step: float
    adjoint_step: float
    n_train: int
    n_val: int
    b_train: int
    b_val: int
    params: tuple

    def get(self, key: str) -> Any:
        for k, v in self.params:
            if k == key:
                return v
        raise KeyError(f"solver {self.name!r} has no parameter {key!r}. Valid choices: "
                       f"{', '.join(k for k, _ in self.params)}")

    @property
    def full_batch(self) -> bool:
        """Whether every minibatch is its whole split (the deterministic limit)."""
        return self.b_train >= self.n_train and self.b_val >= self.n_val


def make_config(name: str, params: Mapping[str, Any], *, inner_lr: float, n_train: int,
                n_val: int) -> SolverConfig:
    """Check ``params`` against the solver's catalog model and derive the step sizes.

    ``inner_lr`` is the problem's η (the default α); ``n_train``/``n_val`` the split sizes.
    A ``batch_size`` larger than a split is clamped to it (documented: the whole split,
    i.e. the deterministic limit), never an error.
    """
    if name not in solver_names():
        raise ValueError(f"Unknown solver {name!r}. Valid choices: {', '.join(solver_names())}")
    checked = check_algorithm_params(name, params, prefix=f"algorithm_params[{name}]")
    merged = {} if checked is None else checked.as_dict()
    alpha = merged.get("step_size")
    alpha = float(inner_lr) if alpha is None else float(alpha)
    ratio = float(merged.get("outer_ratio", 1.0))
    beta = alpha / ratio
    gamma = alpha * float(merged.get("adjoint_ratio", 1.0))
    batch = merged.get("batch_size")
    b_train = n_train if batch is None else min(int(batch), n_train)
    b_val = n_val if batch is None else min(int(batch), n_val)
    return SolverConfig(name=name, inner_step=alpha, outer_step=beta, adjoint_step=gamma,
                        n_train=int(n_train), n_val=int(n_val), b_train=b_train,
                        b_val=b_val, params=tuple(sorted(merged.items())))


def step_costs(cfg: SolverConfig, *, inner: int = 0, hvp: int = 0, cross: int = 0,
               outer: int = 0, train_rows: int = 0, val_rows: int = 0) -> dict:
    """Cost columns of one outer iteration: oracle calls by kind and rows read."""
    return cost_columns(inner, hvp, cross, outer, train_rows + val_rows)


#: the entries of a state's optional ``calls`` vector: cumulative *data-dependent* calls
#: (a while loop to a tolerance, a random truncation), which ``counts(cfg, k)`` cannot know;
#: ``counts`` then gives the fixed part of an iteration and :class:`~hypersweep.algorithms.
#: solver_run.SolverRun` adds the increase of ``calls`` (:func:`calls_costs`)
CALLS = ("inner", "hvp", "cross", "outer", "train_batches", "val_batches")


def calls_costs(cfg: SolverConfig, calls) -> dict:
    """Cost columns of ``calls`` (an increase of a state's ``calls``, ordered as
    :data:`CALLS`): oracle calls by kind, rows = batches × rows per batch."""
    inner, hvp, cross, outer, train_batches, val_batches = (int(c) for c in calls)
    return step_costs(cfg, inner=inner, hvp=hvp, cross=cross, outer=outer,
                      train_rows=train_batches * cfg.b_train,
                      val_rows=val_batches * cfg.b_val)


class Sampler:
    """The minibatch indices of one solver run, identical for both backends.

    ``chunk(start, n_steps)`` returns one int64 array of shape (n_steps, b) per entry of
    ``samples``: the rows step ``start + i`` reads. ``sampling`` (the solver param):
    ``replacement``, rows i.i.d. uniform with replacement from their split (O(batch) per
    draw), draws for steps [j·DRAW_BLOCK, (j+1)·DRAW_BLOCK) from one PCG64 seeded by
    (``seed``, stream, j); ``blocks``, step s of a stream reads the contiguous rows
    [o_e + b·π_e(s mod m), … + b) with m = ⌊n/b⌋ blocks, e = ⌊s/m⌋ the epoch, π_e a
    permutation of the m blocks and o_e ∈ [0, n − m·b] an offset, those of the G =
    max(1, ⌊:data:`EPOCH_GROUP_STEPS`/m⌋) epochs of group ⌊e/G⌋ drawn at once from one
    generator seeded by (``seed``, stream, group); beyond :data:`SHUFFLE_MAX_BLOCKS`
    blocks π_e is an affine bijection seeded per epoch. Either way the draws do not depend
    on the chunking. A split with ≤ b rows
    is read whole (``arange``).
    """

    def __init__(self, cfg: SolverConfig, samples: tuple, seed: int):
        for s in samples:
            if s not in SPLITS:
                raise ValueError(f"solver {cfg.name!r} samples {s!r}. Valid choices: "
                                 f"{', '.join(SPLITS)}")
        self.samples = tuple(samples)
        self.seed = int(seed)
        self.sizes = {"train": (cfg.n_train, cfg.b_train), "val": (cfg.n_val, cfg.b_val)}
        self.name = cfg.name
        params = dict(cfg.params)
        self.sampling = params.get("sampling", "replacement")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"solver {cfg.name!r}: sampling must be one of "
                             f"{', '.join(SAMPLINGS)}, got {self.sampling!r}")

    @functools.lru_cache(maxsize=4)
    def _block(self, j: int) -> list[np.ndarray]:
        out = []
        for slot, split in enumerate(self.samples):
            n, b = self.sizes[split]
            if b >= n:
                out.append(np.broadcast_to(np.arange(n, dtype=np.int64), (DRAW_BLOCK, n)))
                continue
            if self.sampling == "blocks":
                out.append(self._blocks(split, slot, n, b, j))
                continue
            gen = np.random.Generator(np.random.PCG64(
                derive_seed("solver-draws", self.seed, split, slot, j)))
            out.append(gen.integers(0, n, size=(DRAW_BLOCK, b), dtype=np.int64))
        return out

    def _blocks(self, split: str, slot: int, n: int, b: int, j: int) -> np.ndarray:
        """Rows of steps [j·DRAW_BLOCK, (j+1)·DRAW_BLOCK) of one stream, ``blocks``."""
        m = n // b
        steps = np.arange(j * DRAW_BLOCK, (j + 1) * DRAW_BLOCK, dtype=np.int64)
        epochs = steps // m
        starts = np.empty(DRAW_BLOCK, dtype=np.int64)
        if m <= SHUFFLE_MAX_BLOCKS:
            size = max(1, EPOCH_GROUP_STEPS // m)
            groups = epochs // size
            for group in range(int(groups[0]), int(groups[-1]) + 1):
                here = groups == group
                orders, offsets = self._epoch_group(split, slot, n, b, group, size)
                e = epochs[here] - group * size
                starts[here] = offsets[e] + b * orders[e, steps[here] % m]
        else:
            for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
                here = epochs == epoch
                a, c, offset = self._epoch_affine(split, slot, n, b, epoch)
                starts[here] = offset + b * ((a * (steps[here] % m) + c) % m)
        return starts[:, None] + np.arange(b, dtype=np.int64)[None, :]

    @functools.lru_cache(maxsize=8)
    def _epoch_group(self, split: str, slot: int, n: int, b: int, group: int, size: int):
        """The block orders (size, m) and row offsets (size,) of epochs [group·size,
        (group+1)·size): one uniform permutation of the m blocks and one offset in
        [0, n − m·b] per epoch, all from one generator (O(m) per epoch)."""
        m = n // b
        gen = np.random.Generator(np.random.PCG64(
            derive_seed("solver-blocks", self.seed, split, slot, group, size)))
        offsets = gen.integers(0, n - m * b + 1, size=size, dtype=np.int64)
        orders = gen.permuted(np.broadcast_to(np.arange(m, dtype=np.int64), (size, m)), axis=1)
        return orders, offsets

    @functools.lru_cache(maxsize=8)
    def _epoch_affine(self, split: str, slot: int, n: int, b: int, epoch: int):
        """Beyond :data:`SHUFFLE_MAX_BLOCKS` blocks an epoch's order is the bijection
        p ↦ (a·p + c) mod m with random a coprime to m and c, so that a draw stays O(batch)
        in time and memory whatever n: (a, c, the row offset)."""
        m = n // b
        gen = np.random.Generator(np.random.PCG64(
            derive_seed("solver-blocks", self.seed, split, slot, epoch)))
        offset = int(gen.integers(0, n - m * b + 1))
        while True:
            a = int(gen.integers(1, m))
            if np.gcd(a, m) == 1:
                break
        return a, int(gen.integers(0, m)), offset

    def chunk(self, start: int, n_steps: int) -> list[np.ndarray]:
        if not self.samples:
            return []
        pieces: list[list[np.ndarray]] = [[] for _ in self.samples]
        step, end = start, start + n_steps
        while step < end:
            j, offset = divmod(step, DRAW_BLOCK)
            take = min(DRAW_BLOCK - offset, end - step)
            for slot, arr in enumerate(self._block(j)):
                pieces[slot].append(arr[offset:offset + take])
            step += take
        return [np.ascontiguousarray(np.concatenate(p, axis=0)) for p in pieces]

