"""The schemas of ``pipeline_params``: one pydantic model per pipeline.

The pipeline catalog names each model (``PipelineSpec.params_model``); the study validator
reads it at plan time and the pipeline inside every cell (``hpo.check_params``,
``blackbox.check_params``, ``hypergradient_error.run``). A pipeline without a model (a
test pipeline, a benchmark's) accepts any JSON parameters. The shared base and field
checks are :mod:`hypersweep.validation`. Imports neither torch nor jax (nor Ray): only
the catalogs' pure data.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

from hypersweep import algorithms
from hypersweep.algorithms.online_common import OUTER_OPTIMIZERS
from hypersweep.pipelines.catalog import PIPELINES
from hypersweep.problems.catalog import PROBLEMS
from hypersweep.registry import load_object
from hypersweep.validation import (Params, bad, boolean, field, integer, is_numbers, number,
                                   one_of)


def _lam(value: Any) -> Any:
    if value is not None and not is_numbers(value):
        raise bad("must be null (the problem's λ₀), a finite number (broadcast to λ's "
                  f"shape) or a list of finite numbers, got {value!r}")
    return value


def _bound_values(value: Any) -> list | None:
    """A bound flattened to a list of finite numbers (a number is one, a nested list is λ
    in its shape), or None when it is not one."""
    if not is_numbers(value):
        return None
    if not isinstance(value, (list, tuple)):
        return [value]
    return [x for item in value for x in _bound_values(item)]


def _box(box: Any, where: str) -> None:
    """One ``{low, high}`` box at ``where`` (its size is checked against λ in the cell)."""
    if (not isinstance(box, dict) or not {"low", "high"} <= set(box)
            or not set(box) <= {"low", "high", "tied"}):
        got = sorted(box) if isinstance(box, dict) else box
        raise bad(f"must be a mapping with the keys low, high (and optionally tied), got "
                  f"{got!r}", where)
    if not isinstance(box.get("tied", False), bool):
        raise bad(f"must be true or false, got {box['tied']!r}", f"{where}.tied")
    if box.get("tied") and any(isinstance(box[key], list) for key in ("low", "high")):
        raise bad(f"needs numbers for low and high when tied (one number for every "
                  f"coordinate), got low={box['low']!r}, high={box['high']!r}", where)
    low, high = (_bound_values(box[key]) for key in ("low", "high"))
    for key, values in (("low", low), ("high", high)):
        if values is None:
            raise bad(f"must be a finite number or a (nested) list of them, got "
                      f"{box[key]!r}", f"{where}.{key}")
    lists = [isinstance(box[key], list) for key in ("low", "high")]
    if all(lists) and len(low) != len(high):
        raise bad(f"needs as many low as high values, got {len(low)} and {len(high)}",
                  where)
    if not lists[0]:  # a number stands for every coordinate
        low = low * len(high)
    elif not lists[1]:
        high = high * len(low)
    if any(a >= b for a, b in zip(low, high)):
        raise bad(f"needs low < high in every coordinate, got low={box['low']!r}, "
                  f"high={box['high']!r}", where)


def _space(value: Any) -> Any:
    """``{low, high}``, or ``{problem_name: {low, high}}`` (problems not named: defaults)."""
    if value is None:
        return value
    if not isinstance(value, dict):
        raise bad(f"must be null or a mapping like {{low: -6, high: 3}}, got {value!r}")
    if "low" in value or "high" in value or "tied" in value:
        _box(value, "")
        return value
    for name, box in value.items():
        if name not in PROBLEMS.names():
            raise bad(f"is not a problem. Valid choices: {', '.join(PROBLEMS.names())} "
                      "(or the keys low, high for every problem)", f".{name}")
        if box is not None:
            _box(box, f".{name}")
    return value


class HypergradientErrorParams(Params):
    """``hypergradient_error``: the fixed λ at which every estimate is scored."""

    owner: ClassVar[str] = "pipeline 'hypergradient_error'"
    lam: field(_lam) = None


class HpoParams(Params):
    """``hpo``: the outer loop on λ (see :mod:`hypersweep.pipelines.hpo` for each key)."""

    owner: ClassVar[str] = "pipeline 'hpo'"
    outer_steps: field(integer(1, why=" (it bounds the λ updates, time_budget_s only "
                                   "stops them earlier)")) = 100
    time_budget_s: field(number(above=0, nullable=True)) = None
    optimizer: field(one_of(OUTER_OPTIMIZERS)) = "adam"
    outer_lr: field(number(above=0)) = 0.1
    warm_start_w: field(boolean) = False
    warm_start_v: field(boolean) = False
    lam0: field(_lam) = None
    eval_every: field(integer(1)) = 1
    cap_inner_lr: field(boolean) = True
    oracle_metrics: field(boolean) = True

    def algorithm_issues(self, algorithm: str) -> list[str]:
        """``warm_start_v: true`` needs an estimator that takes an adjoint ``v0``."""
        if self.warm_start_v and not algorithms.spec(algorithm).warm_start_adjoint:
            return [(f"pipeline_params.warm_start_v is true, but algorithm {algorithm!r} "
                     f"has no adjoint warm start. Valid choices: "
                     f"{', '.join(algorithms.adjoint_warm_starts())}")]
        return []


class BlackboxParams(Params):
    """``blackbox``: one search per cell (see :mod:`hypersweep.pipelines.blackbox`)."""

    owner: ClassVar[str] = "pipeline 'blackbox'"
    num_samples: field(integer(1, why=" (it bounds the trials, time_budget_s only stops "
                                   "them earlier)")) = 20
    oracle_metrics: field(boolean) = True
    time_budget_s: field(number(above=0, nullable=True)) = None
    space: field(_space) = None
    cap_inner_lr: field(boolean) = True


def check_pipeline_params(pipeline: str, params: Mapping[str, Any] | None, *,
                          prefix: str = "pipeline_params") -> Params | None:
    """``params`` validated by ``pipeline``'s model (None for a pipeline without one);
    issues are named ``prefix.key``."""
    spec = PIPELINES.spec(pipeline)
    if spec.params_model is None:
        return None
    return load_object(spec.params_model).parse(params, prefix=prefix)
