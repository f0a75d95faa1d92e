"""Registries: name -> frozen spec -> lazily imported implementation.

Three catalogs hold every list the package and its tests use: ``problems/catalog.py``
(:class:`ProblemSpec`), ``algorithms/catalog.py`` (:class:`AlgorithmSpec`) and
``pipelines/catalog.py`` (:class:`PipelineSpec`). Code outside them derives its lists from
the registries (``PIPELINES.names()``, ``ALGORITHMS`` filtered by ``kind``), never keeps its
own.

Plugins: ``$HYPERSWEEP_PLUGINS`` names modules (comma-separated) that register more
problems, algorithms or pipelines when imported; :func:`load_plugins` imports them, and the
driver and every actor call it, so a plugin's entries exist wherever cells run.

Pure data and ``importlib``; importing this module never imports torch or jax.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

BACKENDS = ("jax", "torch")
#: what an algorithm is: a hypergradient ``estimator`` fn(problem, lam, *, t, K, seed); an
#: ``online`` (init, step) pair that tunes λ during one training run; a bilevel ``solver``
#: (init, step) pair that updates inner, adjoint and outer variables together; a black-box
#: ``searcher`` factory (Ray Tune); a ``baseline`` with an estimator's signature that
#: solves the inner problem and does not tune λ (``fixed``: the reference a tuning method
#: is compared with, never a hypergradient estimate).
ALGORITHM_KINDS = ("estimator", "online", "solver", "searcher", "baseline")
PLUGINS_ENV = "HYPERSWEEP_PLUGINS"


def load_object(path: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def check_choice(kind: str, value: Any, choices: "list[str] | tuple[str, ...]") -> None:
    """Raise ``ValueError`` naming ``kind`` and listing the valid choices."""
    if value not in choices:
        raise ValueError(
            f"Unknown {kind} {value!r}. Valid choices: {', '.join(map(str, choices))}"
        )


def merge_params(owner: str, defaults: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
    """``params`` over ``defaults``; a key not in ``defaults`` raises ``ValueError`` naming
    ``owner`` (``"problem 'ridge'"``) and listing the valid keys."""
    for key in params:
        if key not in defaults:
            raise ValueError(f"Unknown parameter {key!r} for {owner}. Valid choices: "
                             f"{', '.join(sorted(defaults)) or '(none)'}")
    return {**defaults, **params}


@dataclass(frozen=True)
class AlgorithmSpec:
    """What a hypergradient algorithm is; its math lives in ``impls``.

    ``uses_K``: whether K (linear-system / truncation budget) changes the result.
    ``requires``: problem capabilities it needs (e.g. ``"minibatch"``).
    ``kind``: one of :data:`ALGORITHM_KINDS`.
    ``params``: defaults of its extra keyword params (algorithm params in a study);
    ``params_model``: ``"module:Class"`` of the pydantic model that checks them (None:
    it takes none). ``warm_start_adjoint``: whether it accepts ``v0=``, an adjoint warm
    start. ``consistent``: an iterative estimator whose estimate from t inner and K solver
    steps tends to ∇F(λ) as t, K → ∞ (the generic tests check it against the oracle);
    False for biased-by-design ones and for the oracle itself, which runs no steps.
    """

    name: str
    summary: str
    reference: str
    impls: Mapping[str, str]
    uses_K: bool = False
    requires: frozenset = frozenset()
    kind: str = "estimator"
    params: Mapping[str, Any] = field(default_factory=dict)
    params_model: str | None = None
    warm_start_adjoint: bool = False
    consistent: bool = False
    #: per backend, ``"module:function"`` of its t-grid form (optional): fn(problems,
    #: lams, *, points, seed=0, **params) -> one list of Hypergrad per lane, lane i being
    #: (problems[i], lams[i], points[i] = [(t, K), ...] in increasing t), equal to the
    #: per-(t, K) calls to rounding but with one inner run per lane (JAX: lanes vmapped)
    grid_impls: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        check_choice("algorithm kind", self.kind, ALGORITHM_KINDS)


@dataclass(frozen=True)
class ProblemSpec:
    """What a bilevel problem is; its math lives in the module ``impl``."""

    name: str
    summary: str
    reference: str
    impl: str  # "hypersweep.problems.ridge" : module with build / inner_loss / ...
    lam_parametrization: str
    capabilities: frozenset = frozenset()
    params: Mapping[str, Any] = field(default_factory=dict)  # defaults of make(**params)
    #: the small, well-conditioned instance (params over ``params``) that the generic tests
    #: build: oracle vs finite differences, every estimator vs the oracle, parity
    small: Mapping[str, Any] = field(default_factory=dict)
    #: the black-box searchers' default box (low, high) for every coordinate of λ, in the
    #: λ parametrization; None: λ₀ ± 2 (for a λ without a transform)
    search_box: tuple[float, float] | None = None


@dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline measures; ``run`` is ``"module:function"``, fn(cell) -> PipelineResult.

    ``params_model``: ``"module:Class"`` of the pydantic model of its ``pipeline_params``
    (None: any JSON mapping). ``algorithm_kinds``: the :data:`ALGORITHM_KINDS` it runs.
    """

    name: str
    summary: str
    run: str
    algorithm_kinds: tuple[str, ...]
    params_model: str | None = None
    #: ``"module:function"``, fn(cells) -> iterator of (cell, PipelineResult or the
    #: exception that cell raised), one per cell as soon as it is known, for cells of one
    #: ``Cell.batch_key()`` (None: the cells run one by one through ``run``). If it
    #: raises, the cells it has not yielded run one by one through ``run``, so each still
    #: gets its own status.
    run_batch: str | None = None
    #: ``"module:function"``, fn(cell) -> float: the cell's expected cost in oracle calls,
    #: which caps how many cells share a task (None: t + K)
    cost: str | None = None

    def __post_init__(self):
        for kind in self.algorithm_kinds:
            check_choice("algorithm kind", kind, ALGORITHM_KINDS)


S = TypeVar("S")


class Registry(Generic[S]):
    """An ordered name -> spec table with friendly errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, S] = {}

    def register(self, spec: S) -> S:
        """Add ``spec``; registering an equal spec again (a re-imported plugin) is a no-op."""
        name = spec.name  # type: ignore[attr-defined]
        if name in self._specs and self._specs[name] != spec:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._specs[name] = spec
        return spec

    def spec(self, name: str) -> S:
        check_choice(self.kind, name, self.names())
        return self._specs[name]

    def names(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[S]:
        return iter(self._specs.values())


def load_plugins() -> list[str]:
    """Import the modules named in ``$HYPERSWEEP_PLUGINS``; return their names.

    A module that cannot be imported raises ``ValueError`` naming the variable and the
    module (bad input: the CLI exits 2 before anything runs)."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"${PLUGINS_ENV} names {name!r}, which cannot be imported: "
                             f"{exc}") from exc
    return names


def resolve_impl(spec: AlgorithmSpec, backend: str) -> Callable:
    check_choice("backend", backend, BACKENDS)
    if backend not in spec.impls:
        raise ValueError(
            f"Algorithm {spec.name!r} has no {backend} implementation. "
            f"Valid choices: {', '.join(spec.impls)}"
        )
    return load_object(spec.impls[backend])
