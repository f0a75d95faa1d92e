"""The schemas of ``pipeline_params`` and of algorithm ``params``: one pydantic model each.

Each model is read twice: by the study validator (:mod:`hypersweep.orchestrator.spec`) when
``hypersweep plan`` or ``run`` loads a study, before Ray starts, and by the pipeline inside
every cell (``hpo.check_params``, ``blackbox.check_params``, ``hypergradient_error.run``),
so what plan accepts and what a cell accepts cannot drift apart. A pipeline without a model
here (a test pipeline, a benchmark's) accepts any JSON parameters.

Validation reports every bad key at once, as :class:`ParamsError`: a ``ValueError`` whose
message is one line, the issues joined by ``"; "``, each naming its key path and the valid
range or choices (``pipeline_params.outer_lr must be a finite number > 0, got 0``).

Checks that need more than the mapping itself — the study's algorithms (hpo's
``warm_start_v``) or its t values (ASHA's ``grace_period``) — are methods returning issue
strings, called by the spec at plan time and by the pipeline at run time.

Imports neither torch nor jax (nor Ray): only the catalogs' pure data.
"""
from __future__ import annotations

import difflib
import math
from typing import Annotated, Any, ClassVar, Iterable, Mapping

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from hypersweep.algorithms.catalog import ADJOINT_WARM_START, ALGORITHMS
from hypersweep.algorithms.online_common import OUTER_OPTIMIZERS
from hypersweep.problems.catalog import PROBLEMS


class ParamsError(ValueError):
    """Bad parameters. ``issues``: one message per bad key; ``str()`` joins them by "; "."""

    def __init__(self, issues: Iterable[str]):
        self.issues = tuple(issues)
        super().__init__("; ".join(self.issues))


# ---------------------------------------------------------------------------------------
# Field checks. Each returns the value unchanged (no coercion: the cell_id hashes the
# study's own values) or raises with the whole predicate: "must be ..., got ...".


def _bad(message: str, subpath: str = "") -> PydanticCustomError:
    """``subpath`` extends the key path below the field (``space.ridge.low``)."""
    return PydanticCustomError("hypersweep_param", "{message}",
                               {"message": message, "subpath": subpath})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _integer(minimum: int, *, nullable: bool = False, why: str = ""):
    def check(value: Any) -> Any:
        if value is None and nullable:
            return value
        if not _is_int(value) or value < minimum:
            null = " or null" if nullable else ""
            raise _bad(f"must be an integer >= {minimum}{null}{why}, got {value!r}")
        return value
    return check


def _number(*, above: float | None = None, low: float | None = None,
            high: float | None = None, nullable: bool = False):
    """A finite number ``> above``, or in ``[low, high]``, or any finite number."""
    if above is not None:
        what = f"a finite number > {above:g}"
    elif low is not None:
        what = f"a number in [{low:g}, {high:g}]"
    else:
        what = "a finite number"

    def check(value: Any) -> Any:
        if value is None and nullable:
            return value
        ok = _is_number(value) and (above is None or value > above) and (
            low is None or low <= value <= high)
        if not ok:
            raise _bad(f"must be {what}{' or null' if nullable else ''}, got {value!r}")
        return value
    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"must be true or false, got {value!r}")
    return value


def _one_of(choices: Iterable[str]):
    choices = tuple(choices)

    def check(value: Any) -> str:
        if value not in choices:
            raise _bad(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def _is_numbers(value: Any) -> bool:
    """A finite number, or a non-empty (nested) list of them: λ in any shape."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_numbers(item) for item in value)
    return _is_number(value)


def _lam(value: Any) -> Any:
    if value is not None and not _is_numbers(value):
        raise _bad("must be null (the problem's λ₀), a finite number (broadcast to λ's "
                   f"shape) or a list of finite numbers, got {value!r}")
    return value


def _bound_values(value: Any) -> list | None:
    """A bound flattened to a list of finite numbers (a number is one, a nested list is λ
    in its shape), or None when it is not one."""
    if not _is_numbers(value):
        return None
    if not isinstance(value, (list, tuple)):
        return [value]
    return [number for item in value for number in _bound_values(item)]


def _box(box: Any, where: str) -> None:
    """One ``{low, high}`` box at ``where`` (its size is checked against λ in the cell)."""
    if not isinstance(box, dict) or set(box) != {"low", "high"}:
        got = sorted(box) if isinstance(box, dict) else box
        raise _bad(f"must be a mapping with exactly the keys low, high, got {got!r}", where)
    low, high = (_bound_values(box[key]) for key in ("low", "high"))
    for key, values in (("low", low), ("high", high)):
        if values is None:
            raise _bad(f"must be a finite number or a (nested) list of them, got "
                       f"{box[key]!r}",
                       f"{where}.{key}")
    lists = [isinstance(box[key], list) for key in ("low", "high")]
    if all(lists) and len(low) != len(high):
        raise _bad(f"needs as many low as high values, got {len(low)} and {len(high)}",
                   where)
    if not lists[0]:  # a number stands for every coordinate
        low = low * len(high)
    elif not lists[1]:
        high = high * len(low)
    if any(a >= b for a, b in zip(low, high)):
        raise _bad(f"needs low < high in every coordinate, got low={box['low']!r}, "
                   f"high={box['high']!r}", where)


def _space(value: Any) -> Any:
    """``{low, high}``, or ``{problem_name: {low, high}}`` (problems not named: defaults)."""
    if value is None:
        return value
    if not isinstance(value, dict):
        raise _bad(f"must be null or a mapping like {{low: -6, high: 3}}, got {value!r}")
    if "low" in value or "high" in value:
        _box(value, "")
        return value
    for name, box in value.items():
        if name not in PROBLEMS.names():
            raise _bad(f"is not a problem. Valid choices: {', '.join(PROBLEMS.names())} "
                       "(or the keys low, high for every problem)", f".{name}")
        if box is not None:
            _box(box, f".{name}")
    return value


def _field(check):
    """A field whose whole check is ``check`` (the value is kept as the study wrote it)."""
    return Annotated[Any, BeforeValidator(check)]


# ---------------------------------------------------------------------------------------
# The models.


class _Params(BaseModel):
    """Frozen; unknown keys are errors. ``owner`` names it in messages ("pipeline 'hpo'")."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    owner: ClassVar[str] = ""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {name: field.default for name, field in cls.model_fields.items()}

    def as_dict(self) -> dict[str, Any]:
        """Every key, the study's values over the defaults."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def algorithm_issues(self, algorithm: str) -> list[str]:
        """Pipeline params that the study's ``algorithm`` cannot run with (none here)."""
        return []

    def study_issues(self, *, prefix: str, t_values: Iterable[int]) -> list[str]:
        """Algorithm params that the study's t values rule out (none here)."""
        return []

    @classmethod
    def _unknown_key(cls, key: str, prefix: str) -> str:
        valid = list(cls.model_fields)
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"Unknown {prefix} key {key!r} for {cls.owner}{hint}. Valid choices: "
                f"{', '.join(valid) or '(none)'}")

    @classmethod
    def parse(cls, params: Mapping[str, Any] | None, *, prefix: str):
        """The validated model; :class:`ParamsError` lists every bad key under ``prefix``."""
        try:
            return cls.model_validate(dict(params or {}))
        except ValidationError as exc:
            issues = []
            for error in exc.errors(include_url=False):
                key = ".".join(map(str, error["loc"])) + (error.get("ctx") or {}).get(
                    "subpath", "")
                if error["type"] == "extra_forbidden":
                    issues.append(cls._unknown_key(key, prefix))
                elif error["type"] == "missing":
                    issues.append(f"{prefix}.{key} is required")
                else:
                    issues.append(f"{prefix}.{key} {error['msg']}")
            raise ParamsError(issues) from None


class HypergradientErrorParams(_Params):
    """``hypergradient_error``: the fixed λ at which every estimate is scored."""

    owner: ClassVar[str] = "pipeline 'hypergradient_error'"
    lam: _field(_lam) = None


class HpoParams(_Params):
    """``hpo``: the outer loop on λ (see :mod:`hypersweep.pipelines.hpo` for each key)."""

    owner: ClassVar[str] = "pipeline 'hpo'"
    outer_steps: _field(_integer(1, why=" (it bounds the λ updates, time_budget_s only "
                                     "stops them earlier)")) = 100
    time_budget_s: _field(_number(above=0, nullable=True)) = None
    optimizer: _field(_one_of(OUTER_OPTIMIZERS)) = "adam"
    outer_lr: _field(_number(above=0)) = 0.1
    warm_start_w: _field(_boolean) = False
    warm_start_v: _field(_boolean) = False
    lam0: _field(_lam) = None
    eval_every: _field(_integer(1)) = 1
    cap_inner_lr: _field(_boolean) = True

    def algorithm_issues(self, algorithm: str) -> list[str]:
        """``warm_start_v: true`` needs an estimator that takes an adjoint ``v0``."""
        if self.warm_start_v and algorithm not in ADJOINT_WARM_START:
            return [(f"pipeline_params.warm_start_v is true, but algorithm {algorithm!r} "
                     f"has no adjoint warm start. Valid choices: "
                     f"{', '.join(ADJOINT_WARM_START)}")]
        return []


class BlackboxParams(_Params):
    """``blackbox``: one search per cell (see :mod:`hypersweep.pipelines.blackbox`)."""

    owner: ClassVar[str] = "pipeline 'blackbox'"
    num_samples: _field(_integer(1, why=" (it bounds the trials, time_budget_s only stops "
                                     "them earlier)")) = 20
    time_budget_s: _field(_number(above=0, nullable=True)) = None
    space: _field(_space) = None
    cap_inner_lr: _field(_boolean) = True


#: pipeline name -> its ``pipeline_params`` model
PIPELINE_PARAMS: dict[str, type[_Params]] = {
    "hypergradient_error": HypergradientErrorParams,
    "hpo": HpoParams,
    "blackbox": BlackboxParams,
}


# Algorithm models have no defaults of their own: they validate the catalog's defaults
# merged with the study's values, so the catalog stays the one place defaults live (and a
# test checks that each model has exactly the catalog's keys).


class StocbioParams(_Params):
    owner: ClassVar[str] = "algorithm 'stocbio'"
    batch_size: _field(_integer(1))
    neumann_lr: _field(_number(above=0, nullable=True))


class HyperdistillParams(_Params):
    owner: ClassVar[str] = "algorithm 'hyperdistill'"
    gamma: _field(_number(low=0, high=1))
    theta0: _field(_number())
    theta_every: _field(_integer(1))


class T1t2Params(_Params):
    owner: ClassVar[str] = "algorithm 't1t2'"
    fd_eps: _field(_number(above=0))


class GreedyParams(_Params):
    owner: ClassVar[str] = "algorithm 'greedy'"
    gamma: _field(_number(low=0, high=1))


class GridParams(_Params):
    owner: ClassVar[str] = "algorithm 'grid'"
    grid_points: _field(_integer(2, nullable=True))


class TpeParams(_Params):
    owner: ClassVar[str] = "algorithm 'tpe'"
    n_startup_trials: _field(_integer(0))


class HyperoptParams(_Params):
    owner: ClassVar[str] = "algorithm 'hyperopt'"
    n_initial_points: _field(_integer(0))


class AshaParams(_Params):
    owner: ClassVar[str] = "algorithm 'asha'"
    grace_period: _field(_integer(1, nullable=True))
    reduction_factor: _field(_number(above=1))
    workers: _field(_integer(1))
    report_every: _field(_integer(1, nullable=True))

    def study_issues(self, *, prefix: str, t_values: Iterable[int]) -> list[str]:
        """A rung below the first report, or past t, never fills: grace_period ≤ every t."""
        too_short = [t for t in t_values if self.grace_period is not None
                     and self.grace_period > t]
        if too_short:
            return [(f"{prefix}.grace_period must be <= every t of the study (it counts "
                     f"inner steps per trial), got {self.grace_period} > t={min(too_short)}")]
        return []


#: algorithm name -> the model of its ``params`` (algorithms without params need none)
ALGORITHM_PARAMS: dict[str, type[_Params]] = {
    "stocbio": StocbioParams, "hyperdistill": HyperdistillParams, "t1t2": T1t2Params,
    "greedy": GreedyParams, "grid": GridParams, "tpe": TpeParams,
    "hyperopt": HyperoptParams, "asha": AshaParams,
}


# ---------------------------------------------------------------------------------------
# Entry points.


def check_pipeline_params(pipeline: str, params: Mapping[str, Any] | None):
    """``params`` validated by ``pipeline``'s model (None for a pipeline without one)."""
    model = PIPELINE_PARAMS.get(pipeline)
    return None if model is None else model.parse(params, prefix="pipeline_params")


def check_algorithm_params(name: str, params: Mapping[str, Any] | None, *,
                           prefix: str = "params"):
    """The algorithm's catalog defaults merged with ``params``, validated by its model
    (None for an algorithm without one); issues are named ``<prefix>.<key>``."""
    model = ALGORITHM_PARAMS.get(name)
    if model is None:
        return None
    return model.parse({**ALGORITHMS.spec(name).params, **(params or {})}, prefix=prefix)


__all__ = ["ParamsError", "PIPELINE_PARAMS", "ALGORITHM_PARAMS", "check_pipeline_params",
           "check_algorithm_params", "HpoParams", "BlackboxParams",
           "HypergradientErrorParams"]
