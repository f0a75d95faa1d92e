"""Registries: name -> frozen spec -> lazily imported implementation.

Pure data and ``importlib``; importing this module never imports torch or jax.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

BACKENDS = ("jax", "torch")


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


@dataclass(frozen=True)
class AlgorithmSpec:
    """What a hypergradient algorithm is; its math lives in ``impls``.

    ``uses_K``: whether K (linear-system / truncation budget) changes the result.
    ``requires``: problem capabilities it needs (e.g. ``"minibatch"``).
    ``kind``: ``"hypergradient"`` (fn(problem, lam, *, t, K, seed)) or ``"online"``
    (an ``(init, step)`` pair that tunes λ during one training run).
    """

    name: str
    summary: str
    reference: str
    impls: Mapping[str, str]
    uses_K: bool = False
    requires: frozenset = frozenset()
    kind: str = "hypergradient"
    params: Mapping[str, Any] = field(default_factory=dict)  # defaults of extra keyword params


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


S = TypeVar("S")


class Registry(Generic[S]):
    """An ordered name -> spec table with friendly errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, S] = {}

    def register(self, spec: S) -> S:
        name = spec.name  # type: ignore[attr-defined]
        if name in self._specs:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._specs[name] = spec
        return spec

    def unregister(self, name: str) -> None:
        self._specs.pop(name, None)

    def spec(self, name: str) -> S:
        check_choice(self.kind, name, self.names())
        return self._specs[name]

    def names(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[S]:
        return iter(self._specs.values())


def resolve_impl(spec: AlgorithmSpec, backend: str) -> Callable:
    check_choice("backend", backend, BACKENDS)
    if backend not in spec.impls:
        raise ValueError(
            f"Algorithm {spec.name!r} has no {backend} implementation. "
            f"Valid choices: {', '.join(spec.impls)}"
        )
    return load_object(spec.impls[backend])
