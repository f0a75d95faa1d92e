"""Black-box hyperparameter searchers (Ray Tune's own classes), by name, driven in-process.

A black-box baseline treats ``F(λ) ≈ L_out(w_t(λ), λ)`` as an opaque function: each trial
picks a λ in a box (:class:`SearchSpace`), the trial loop of :mod:`hypersweep.algorithms.
trials` solves the inner problem with t steps of Φ and reports the validation loss. The
cell's ``t`` is therefore the per-trial inner budget, and ``K`` is unused. The catalog
(``kind="searcher"``) names these factories, ``fn(space, *, num_samples, seed, max_t,
**params) -> TuneSearch``; its ``params`` are their keyword options.

=====================  ===========================================================
name                   Ray Tune objects (imported lazily, like Tune's SEARCH_ALG_IMPORT)
=====================  ===========================================================
``grid``               ``BasicVariantGenerator`` over ``tune.grid_search`` per coordinate
``random``             ``BasicVariantGenerator(random_state=seed)``, ``tune.uniform``
``tpe``                ``ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed)))``
``hyperopt``           ``ConcurrencyLimiter(HyperOptSearch(random_state_seed=seed))``
``asha``               random search + ``AsyncHyperBandScheduler``, inner steps = resource
=====================  ===========================================================

(``bohb`` is not offered: it needs ``hpbandster`` and ``ConfigSpace``, which are not
dependencies of hypersweep.)

Where trials run — the design
-----------------------------
A cell already runs inside a Ray actor that holds its CPUs. Calling ``Tuner.fit()`` there
would ask the same cluster for more CPUs: on a 2-CPU machine whose CPUs the actor pool
holds, the trials wait forever (a resource deadlock), and on a cluster every cell would
spawn its own trial actors, Tune driver state and ``storage_path`` tree. So a cell drives
the Tune *search algorithms* in-process, through the same calls Tune's controller makes:
``Searcher.suggest`` / ``on_trial_complete`` (``BasicVariantGenerator.next_trial`` for
grid and random) and, for ASHA, ``TrialScheduler.on_trial_add`` / ``on_trial_result`` /
``on_trial_complete``. Trials are evaluated one after another in the cell's process, so
a cell costs exactly what its trials cost, uses only the resources its actor holds,
writes nothing under ``~/ray_results`` (the variant generator's experiment is pointed at
a temporary directory that is removed afterwards), and its wall time is directly
comparable with a gradient-based HPO cell on the same resources. Model-based searchers
are wrapped in ``ConcurrencyLimiter(max_concurrent=1)``, which is what sequential
evaluation means. ASHA interleaves ``workers`` trials round-robin (one report interval
each), as that many parallel workers would, so its rungs fill the way they do in Tune.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from typing import Any

import numpy as np

METRIC = "val_loss"
MODE = "min"
#: the ASHA resource: inner steps of Φ run so far in the trial
RESOURCE = "inner_steps"
#: grid search over more coordinates than this is refused (the grid grows as points^d)
MAX_GRID_DIMS = 3
#: half-width of the default box around λ₀ for problems without a catalog ``search_box``
DEFAULT_HALF_WIDTH = 2.0


# ---------------------------------------------------------------------------------------
# The search space


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A box in the problem's λ parametrization: one ``tune.uniform`` per coordinate.

    ``names[i]`` (``lam_0``, ``lam_1``, ...) is the i-th coordinate of λ flattened in C
    order; ``shape`` is λ's shape.
    """

    names: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    shape: tuple[int, ...]
    #: one searched number (``names == ("lam",)``) broadcast to every coordinate of λ
    tied: bool = False

    @property
    def dim(self) -> int:
        return len(self.names)

    def tune_space(self) -> dict:
        from ray import tune
        return {n: tune.uniform(lo, hi) for n, lo, hi in zip(self.names, self.low, self.high)}

    def grid_space(self, points: int) -> dict:
        from ray import tune
        return {n: tune.grid_search([float(v) for v in np.linspace(lo, hi, points)])
                for n, lo, hi in zip(self.names, self.low, self.high)}

    def to_lam(self, config: dict) -> np.ndarray:
        if self.tied:
            return np.full(self.shape, float(config[self.names[0]]))
        return np.array([float(config[n]) for n in self.names],
                        dtype=np.float64).reshape(self.shape)

    def center(self) -> np.ndarray:
        return self.to_lam({n: 0.5 * (lo + hi)
                            for n, lo, hi in zip(self.names, self.low, self.high)})


def _bounds_array(value: Any, size: int, key: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(size, float(arr))
    arr = arr.reshape(-1)
    if arr.size != size:
        raise ValueError(f"space.{key} must be a number or a list of {size} numbers (one "
                         f"per coordinate of λ); got {len(arr)} values")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"space.{key} must be finite; got {value!r}")
    return arr


def search_space(problem, spec: dict | None = None) -> SearchSpace:
    """The box searched for ``problem``: ``spec`` = ``{low, high}`` (numbers, or one per
    coordinate), or ``{problem_name: {low, high}, ...}``; None: the problem's catalog
    ``search_box``, or λ₀ ± :data:`DEFAULT_HALF_WIDTH` for a problem without one.
    ``tied: true`` searches one number in [low, high] set to every coordinate of λ (one
    shared penalty: the usual black-box baseline for a per-feature or per-example λ of
    10⁴–10⁵ coordinates, where a per-coordinate box is out of reach of any searcher)."""
    lam0 = problem.initial_hyperparams()
    size = int(lam0.size)
    if spec is not None and not isinstance(spec, dict):
        raise ValueError(f"space must be a mapping like {{low: -6, high: 3}}; got {spec!r}")
    if spec and "low" not in spec and "high" not in spec:
        spec = spec.get(problem.name)
    tied = bool(spec.get("tied", False)) if spec else False
    if spec:
        unknown = sorted(set(spec) - {"low", "high", "tied"})
        if unknown or "low" not in spec or "high" not in spec:
            raise ValueError(f"space for problem {problem.name!r} needs the keys low, high "
                             f"(and optionally tied); got {sorted(spec)}")
        if tied:  # one number for every coordinate of λ
            size = 1
        low = _bounds_array(spec["low"], size, "low")
        high = _bounds_array(spec["high"], size, "high")
    elif problem.spec.search_box is not None:
        low, high = (np.full(size, b) for b in problem.spec.search_box)
    else:
        low = lam0.reshape(-1) - DEFAULT_HALF_WIDTH
        high = lam0.reshape(-1) + DEFAULT_HALF_WIDTH
    if np.any(low >= high):
        raise ValueError(f"space for problem {problem.name!r} needs low < high in every "
                         f"coordinate; got low={low.tolist()}, high={high.tolist()}")
    names = ("lam",) if tied else tuple(f"lam_{i}" for i in range(size))
    return SearchSpace(names, tuple(map(float, low)), tuple(map(float, high)),
                       tuple(lam0.shape), tied=tied)


# ---------------------------------------------------------------------------------------
# Searchers


@dataclasses.dataclass
class Suggestion:
    trial_id: str
    config: dict
    trial: Any = None  # the Tune ``Trial`` (variant generator) or None (Searcher)


class TuneSearch:
    """A Ray Tune search algorithm (and optional scheduler) driven without a Tuner.

    ``suggest()`` returns the next :class:`Suggestion` or None when the search is
    exhausted; ``complete(s, objective)`` tells the searcher the final objective.
    ``workers``: trials interleaved round-robin (1 = strictly sequential).
    ``report_every``: inner steps between two reports of a trial (None: one report at t).
    """

    name: str = ""
    scheduler: Any = None
    workers: int = 1
    report_every: int | None = None

    def __init__(self, space: SearchSpace, seed: int):
        self.space = space
        self.seed = seed

    def suggest(self) -> Suggestion | None:
        raise NotImplementedError

    def complete(self, suggestion: Suggestion, objective: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _VariantSearch(TuneSearch):
    """Grid or random search through ``BasicVariantGenerator``."""

    def __init__(self, space: SearchSpace, seed: int, *, config: dict, num_samples: int):
        super().__init__(space, seed)
        from ray.tune.search.basic_variant import BasicVariantGenerator
        # The experiment spec needs a storage_path; Tune only writes a marker file there.
        self._storage = tempfile.TemporaryDirectory(prefix="hypersweep-bvg-")
        self.generator = BasicVariantGenerator(random_state=seed)
        self.generator.add_configurations({"blackbox": {
            "run": _unused_tune_trainable, "config": config, "num_samples": num_samples,
            "storage_path": self._storage.name}})

    def suggest(self) -> Suggestion | None:
        trial = self.generator.next_trial()
        if trial is None:
            return None
        return Suggestion(trial.trial_id, dict(trial.config), trial)

    def complete(self, suggestion: Suggestion, objective: float) -> None:
        self.generator.on_trial_complete(suggestion.trial_id, {METRIC: objective})

    def close(self) -> None:
        self._storage.cleanup()


class _SearcherSearch(TuneSearch):
    """A model-based ``Searcher`` behind ``ConcurrencyLimiter(max_concurrent=1)``."""

    def __init__(self, space: SearchSpace, seed: int, *, searcher):
        super().__init__(space, seed)
        from ray.tune.search import ConcurrencyLimiter
        self.searcher = ConcurrencyLimiter(searcher, max_concurrent=1)
        # What Tuner does with param_space: converts the tune.uniform domains.
        if not self.searcher.set_search_properties(METRIC, MODE, space.tune_space()):
            raise ValueError(f"searcher {type(searcher).__name__} refused the search space")
        self._count = 0

    def suggest(self) -> Suggestion | None:
        from ray.tune.search import Searcher
        trial_id = f"{self.name}_{self._count:05d}"
        config = self.searcher.suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return None
        self._count += 1
        return Suggestion(trial_id, dict(config))

    def complete(self, suggestion: Suggestion, objective: float) -> None:
        self.searcher.on_trial_complete(suggestion.trial_id, {METRIC: objective})


def _unused_tune_trainable(config):  # pragma: no cover - never run; names the experiment
    raise RuntimeError("hypersweep drives Tune searchers in-process; see searchers.py")


def grid(space: SearchSpace, *, num_samples: int, seed: int, max_t: int,
         grid_points: int | None = None) -> TuneSearch:
    """Grid search: ``grid_points`` evenly spaced values per coordinate (default: the
    largest n with nᵈ ≤ num_samples, at least 2). Refused for d > :data:`MAX_GRID_DIMS`.
    ``seed``, ``max_t`` unused. Cost: nᵈ trials (capped at num_samples by the pipeline)."""
    if space.dim > MAX_GRID_DIMS:
        raise ValueError(f"grid search needs a λ of at most {MAX_GRID_DIMS} coordinates; "
                         f"this problem's has {space.dim}. Valid choices for it: random, "
                         f"tpe, hyperopt, asha")
    if grid_points is None:
        grid_points = max(2, int(math.floor(num_samples ** (1.0 / space.dim) + 1e-9)))
    if isinstance(grid_points, bool) or not isinstance(grid_points, int) or grid_points < 2:
        raise ValueError(f"grid_points must be an integer >= 2; got {grid_points!r}")
    search = _VariantSearch(space, seed, config=space.grid_space(grid_points), num_samples=1)
    search.name = "grid"
    return search


def random_search(space: SearchSpace, *, num_samples: int, seed: int,
                  max_t: int) -> TuneSearch:
    """Uniform random search in the box (``BasicVariantGenerator(random_state=seed)``)."""
    search = _VariantSearch(space, seed, config=space.tune_space(), num_samples=num_samples)
    search.name = "random"
    return search


def tpe(space: SearchSpace, *, num_samples: int, seed: int, max_t: int,
        n_startup_trials: int = 10) -> TuneSearch:
    """Optuna's Tree-structured Parzen Estimator; the first ``n_startup_trials`` are
    uniform random. Reference: Bergstra et al. 2011; Akiba et al. 2019 (Optuna)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(n_startup_trials))
    search = _SearcherSearch(space, seed, searcher=OptunaSearch(sampler=sampler))
    search.name = "tpe"
    return search


def hyperopt(space: SearchSpace, *, num_samples: int, seed: int, max_t: int,
             n_initial_points: int = 10) -> TuneSearch:
    """HyperOpt's TPE; the first ``n_initial_points`` are random. Reference: Bergstra et
    al. 2013 (hyperopt)."""
    from ray.tune.search.hyperopt import HyperOptSearch
    logging.getLogger("hyperopt").setLevel(logging.WARNING)
    search = _SearcherSearch(space, seed, searcher=HyperOptSearch(
        random_state_seed=seed, n_initial_points=int(n_initial_points)))
    search.name = "hyperopt"
    return search


def asha(space: SearchSpace, *, num_samples: int, seed: int, max_t: int,
         grace_period: int | None = None, reduction_factor: float = 3.0,
         workers: int = 4, report_every: int | None = None) -> TuneSearch:
    """Random search + asynchronous successive halving with the inner steps as resource.

    A trial reports ``L_out(w_s, λ)`` every ``report_every`` inner steps (default: the
    grace period) up to ``max_t`` = the cell's t; at rungs grace·rfᵏ ASHA stops it unless
    it is in the top 1/rf of the trials recorded there. ``grace_period`` defaults to
    max(1, round(t / rf³)) (four rungs). ``workers`` trials are interleaved.
    Reference: Li et al. 2020 (ASHA).
    """
    from ray.tune.schedulers import AsyncHyperBandScheduler
    rf = float(reduction_factor)
    if not rf > 1:
        raise ValueError(f"reduction_factor must be > 1; got {reduction_factor!r}")
    if grace_period is None:
        grace_period = max(1, int(round(max_t / rf ** 3)))
    if not isinstance(grace_period, int) or not 1 <= grace_period <= max_t:
        raise ValueError(f"grace_period must be an integer in [1, t={max_t}]; "
                         f"got {grace_period!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1; got {workers!r}")
    search = random_search(space, num_samples=num_samples, seed=seed, max_t=max_t)
    search.name = "asha"
    search.scheduler = AsyncHyperBandScheduler(
        time_attr=RESOURCE, metric=METRIC, mode=MODE, max_t=max_t,
        grace_period=grace_period, reduction_factor=rf)
    search.workers = workers
    search.report_every = int(report_every or grace_period)
    return search
