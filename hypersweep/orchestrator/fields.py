"""The parts of a study: small field validators and the section models (problem and
algorithm entries, ``resources``, ``mlflow``) that :class:`~.spec.StudySpec` is made of.

Every check raises a pydantic error whose message is ours, so the :class:`~.spec.StudyError`
built from it reads ``<key path>: <message>`` with the valid choices. Imports neither
torch, jax nor Ray.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, \
    model_validator

from hypersweep import algorithms as algorithm_registry
from hypersweep import problems as problem_registry
from hypersweep.io.tracking import DEFAULT_TRACKING_URI
from hypersweep.orchestrator.cell import canonical_json
from hypersweep.orchestrator.resources import RESOURCE_PRECISION
from hypersweep.problems.jax.compile_cache import OFF as CACHE_OFF  # no JAX import
from hypersweep.validation import bad as _fail
from hypersweep.validation import boolean, field
from hypersweep.validation import is_int as _is_int
from hypersweep.validation import is_number as _is_number


# ---------------------------------------------------------------------------------------
# Small validators. Each raises a PydanticCustomError (``_fail``, that is
# :func:`hypersweep.validation.bad`) whose whole message is ours, so the final StudyError
# reads "<key path>: <message>". ``subpath`` extends the key path for checks made above
# the offending key (e.g. an unknown problem parameter).


def _choices(values) -> str:
    return ", ".join(map(str, values))


def _mapping(value: Any, what: str) -> dict:
    """A mapping; None (an empty YAML key) stands for ``{}``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"must be {what}, got {value!r}")
    return value


def _int_at_least(minimum: int):
    def check(value: Any) -> int:
        if not _is_int(value) or value < minimum:
            raise _fail(f"must be an integer >= {minimum}, got {value!r}")
        return value
    return check


def _k_value(value: Any) -> int | str:
    if value == "t" or (_is_int(value) and value >= 0):
        return value
    raise _fail(f"must be an integer >= 0 or \"t\" (K = t), got {value!r}")


def _as_list(value: Any, what: str) -> list:
    """A YAML scalar stands for a one-element list."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise _fail(f"must list at least one {what}")
        return list(value)
    if isinstance(value, dict) or value is None:
        raise _fail(f"must be a list of {what}s, got {value!r}")
    return [value]


def _no_duplicates(values: list, *, what: str = "") -> list:
    """``values``, or an error at a repeated one; ``what`` names the list (``t[0]``)."""
    seen: dict = {}
    for index, value in enumerate(values):
        if value in seen:
            raise _fail(f"repeats {what}[{seen[value]}] ({value!r}); each value must appear "
                        "once", f"[{index}]")
        seen[value] = index
    return values


def _check_json(value: Any, path: str = "") -> None:
    """Params travel as canonical JSON: plain scalars, lists and string-keyed mappings."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(f"must be a finite number, got {value!r}", path)
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(f"keys must be strings, got {key!r}", path)
            _check_json(item, f"{path}.{key}")
        return
    raise _fail(f"must be a number, string, boolean, list or mapping, got {value!r}", path)


def _check_param_type(default: Any, value: Any) -> bool:
    """Whether ``value`` fits a parameter whose catalog default is ``default``.

    Catches typos (``n_train: 1OO``) without second-guessing the problem's own checks:
    a None default accepts anything, a float default any number or list of numbers.
    """
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return _is_int(value)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (float, tuple, list)):
        items = value if isinstance(value, (list, tuple)) else [value]
        return all(_is_number(item) for item in items)
    return True


def _float_field(*, minimum: float = 0.0, strict: bool = False, ray: bool = False):
    """A finite number ``> minimum`` (strict) or ``>= minimum``; ``ray``: Ray's precision."""

    def check(value: Any) -> float:
        relation = ">" if strict else ">="
        if not _is_number(value):
            raise _fail(f"must be a number {relation} {minimum:g}, got {value!r}")
        if (value <= minimum) if strict else (value < minimum):
            raise _fail(f"must be {relation} {minimum:g}, got {value!r}")
        if ray:
            units = value / RESOURCE_PRECISION
            if abs(units - round(units)) > 1e-6:
                raise _fail(f"fractions must be multiples of {RESOURCE_PRECISION:g} "
                            f"(Ray's resource precision), got {value!r}")
            if value > 1 and value != int(value):
                raise _fail(f"quantities above 1 must be whole numbers (Ray), got {value!r}")
        return float(value)

    return check


# ---------------------------------------------------------------------------------------
# The schema.


def json_mapping(value: Any) -> dict:
    """A mapping (None: ``{}``) of JSON values: ``pipeline_params``, study-wide or an
    algorithm's overrides."""
    value = _mapping(value, "a mapping")
    _check_json(value)
    return value


def t_grid(value: Any) -> list:
    """A t grid: one value or a list, without repeats (each value checked by its field)."""
    return _no_duplicates(_as_list(value, "t value"), what="t")


def k_grid(value: Any) -> list:
    """A K grid: one value or a list, without repeats."""
    return _no_duplicates(_as_list(value, "K value"), what="K")


class _Section(BaseModel):
    """Frozen, and every key outside the declared ones is an error listing the valid keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: fields set by the loader, never from YAML
    internal_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def user_keys(cls) -> list[str]:
        return [name for name in cls.model_fields if name not in cls.internal_fields]

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, dict):
            raise _fail(f"must be a mapping with keys {_choices(cls.user_keys())}, "
                        f"got {data!r}")
        valid = cls.user_keys()
        for key in data:
            if key not in valid:
                raise _fail(f"unknown key {key!r}. Valid keys: {_choices(valid)}")
        return data


class _Entry(_Section):
    """A named registry entry of the study with keyword parameters, checked against the
    registry's defaults (``kind``: "problem" or "algorithm")."""

    kind: ClassVar[str] = ""
    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def params_json(self) -> str:
        return canonical_json(self.params)

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}{self.params_json}"

    @field_validator("params", mode="before")
    @classmethod
    def _mapping(cls, params: Any) -> dict:
        return _mapping(params, "a mapping of parameter names to values")

    def _allowed(self) -> dict:
        raise NotImplementedError

    def _registry_check(self) -> None:
        raise NotImplementedError

    def _value_choices(self) -> dict:
        """The params that take one of a fixed set of values, with those values."""
        return {}

    @model_validator(mode="after")
    def _params_known(self):
        allowed, fixed = self._allowed(), self._value_choices()
        for key, value in self.params.items():
            if key not in allowed:
                raise _fail(f"unknown parameter for {self.kind} {self.name!r}. Valid choices: "
                            f"{_choices(sorted(allowed)) or '(none)'}", f".params.{key}")
            _check_json(value, f".params.{key}")
            if not _check_param_type(allowed[key], value):
                raise _fail(f"expected a value like the default {allowed[key]!r}, "
                            f"got {value!r}", f".params.{key}")
            if key in fixed and value not in fixed[key]:
                raise _fail(f"{value!r} is not a {key} of {self.kind} {self.name!r}. Valid "
                            f"choices: {_choices(fixed[key])}", f".params.{key}")
        try:
            self._registry_check()
        except ValueError as exc:  # belt and braces: the registry has the last word
            raise _fail(str(exc), ".params") from None
        return self


class ProblemEntry(_Entry):
    """One problem of the study and the keyword parameters passed to ``problems.make``."""

    kind: ClassVar[str] = "problem"

    @field_validator("name", mode="before")
    @classmethod
    def _registered(cls, name: Any) -> str:
        return _problem_name(name)

    def _allowed(self) -> dict:
        return problem_registry.valid_params(self.name)

    def _registry_check(self) -> None:
        problem_registry.check_params(self.name, self.params)

    def _value_choices(self) -> dict:
        return problem_registry.param_choices(self.name)


class AlgorithmEntry(_Entry):
    """One algorithm of the study and its extra keyword parameters (e.g. ``batch_size``).

    Per-algorithm overrides of the study-wide settings, for this entry's cells only:
    ``pipeline_params`` (merged over the study's, key by key: e.g. ``outer_lr`` or
    ``eval_every``), ``t`` and ``K`` (replacing the study's grids). Checked by the same
    models as the study's (:func:`~.checks.check_params`)."""

    kind: ClassVar[str] = "algorithm"
    pipeline_params: Annotated[dict[str, Any], BeforeValidator(json_mapping)] = Field(
        default_factory=dict)
    t: Annotated[tuple[Annotated[int, BeforeValidator(_int_at_least(1))], ...] | None,
                 BeforeValidator(lambda v: None if v is None else t_grid(v))] = None
    K: Annotated[tuple[Annotated[Any, BeforeValidator(_k_value)], ...] | None,
                 BeforeValidator(lambda v: None if v is None else k_grid(v))] = None

    @property
    def overrides_json(self) -> str:
        """The overrides as canonical JSON ("" when there are none)."""
        over = {key: value for key, value in (("pipeline_params", self.pipeline_params),
                                               ("t", self.t), ("K", self.K)) if value}
        return canonical_json(over) if over else ""

    @property
    def label(self) -> str:
        return super().label + (f" {self.overrides_json}" if self.overrides_json else "")

    @property
    def spec(self):
        return algorithm_registry.spec(self.name)

    @field_validator("name", mode="before")
    @classmethod
    def _registered(cls, name: Any) -> str:
        return _algorithm_name(name)

    def _allowed(self) -> dict:
        return dict(algorithm_registry.spec(self.name).params)

    def _registry_check(self) -> None:
        algorithm_registry.check_params(self.name, self.params)


def _problem_name(name: Any) -> str:
    if name not in problem_registry.names():
        raise _fail(f"unknown problem {name!r}. Valid choices: "
                    f"{_choices(problem_registry.names())}")
    return name


def _algorithm_name(name: Any) -> str:
    if name not in algorithm_registry.names():
        raise _fail(f"unknown algorithm {name!r}. Valid choices: "
                    f"{_choices(algorithm_registry.names())}")
    return name


def _entry(check_name):
    """A bare name stands for ``{name: ..., params: {}}``; the name is checked here so the
    error path is ``algorithms[2]`` rather than ``algorithms[2].name``."""

    def normalize(value: Any) -> Any:
        if isinstance(value, str):
            return {"name": check_name(value)}
        return value

    return normalize


class Resources(_Section):
    """Per-actor Ray resources. Fractions share a device (0.25 GPU = four actors)."""

    num_cpus: Annotated[float, BeforeValidator(_float_field(ray=True))] = 1.0
    num_gpus: Annotated[float, BeforeValidator(_float_field(ray=True))] = 0.0
    memory_mb: Annotated[float | None, BeforeValidator(
        lambda v: None if v is None else _float_field(strict=True)(v))] = None

    @model_validator(mode="after")
    def _something_to_hold(self) -> "Resources":
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise _fail("must be > 0 unless num_gpus > 0 (an actor needs a CPU or a GPU), "
                        "got 0", ".num_cpus")
        return self


class MlflowConfig(_Section):
    """Where the driver logs runs; ``experiment`` defaults to the study name."""

    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment: str | None = None
    enabled: field(boolean) = True  # strictly true/false

    @field_validator("tracking_uri", mode="before")
    @classmethod
    def _uri(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _fail(f"must be a non-empty string (e.g. sqlite:///results/mlflow.db), "
                        f"got {value!r}")
        return value

    @field_validator("experiment", mode="before")
    @classmethod
    def _experiment(cls, value: Any) -> str | None:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise _fail(f"must be a non-empty string or null, got {value!r}")
        return value


class CompileCache(_Section):
    """JAX's persistent compilation cache for the study's actors
    (:mod:`hypersweep.problems.jax.compile_cache`). ``dir`` null: ``$HYPERSWEEP_CACHE_DIR``
    as the driver has it, else each node's ``~/.cache/hypersweep/jax``; ``~`` is expanded
    on the node that runs the actor, a relative path is taken from the working directory at
    load time."""

    enabled: field(boolean) = True  # strictly true/false
    dir: str | None = None

    @field_validator("dir", mode="before")
    @classmethod
    def _dir(cls, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or (isinstance(value, str)
                                       and value.strip().lower() in CACHE_OFF):
            raise _fail(f"is a directory path; to turn the cache off write enabled: false, "
                        f"got {value!r}")
        if not isinstance(value, str) or not value.strip():
            raise _fail(f"must be a directory path or null, got {value!r}")
        value = value.strip()
        if value.startswith("~") or Path(value).is_absolute():
            return value
        return str(Path(value).absolute())


class Batching(_Section):
    """How many cells of one ``batch_key`` the driver may send as one task, for pipelines
    with ``run_batch`` (others always send one cell per task): at most ``max_cells``
    cells (1 turns batching off) whose expected costs in oracle calls (the pipeline's
    ``cost``, else t + K) sum to at most ``max_cost``; a cell costing more runs alone."""

    max_cells: Annotated[int, BeforeValidator(_int_at_least(1))] = 64
    max_cost: Annotated[float, BeforeValidator(_float_field(strict=True))] = 200_000.0
