"""Study YAML -> frozen :class:`StudySpec` -> a stream of :class:`~.cell.Cell`.

A study is validated whole, at the edge, before anything runs: ``load_study`` either
returns a frozen spec or raises :class:`StudyError` whose message is one line naming the
key path, the offending value and the valid choices. Validation never imports torch, jax
or Ray and never writes anything. It covers ``pipeline_params`` and algorithm ``params``,
checked by the same models the cells use (:mod:`hypersweep.pipelines.params`), and each
problem's ``data:`` file, which is read and built once in numpy.

A study expands to the cells ``problems × algorithms × backends × t × K × seeds`` (in that
order, deterministically), where ``t`` is the number of inner iterations (steps of Φ) and
``K`` the algorithm's second budget (adjoint solver steps, truncation length, Neumann
terms); ``K: t`` means K = t. Algorithms whose spec says ``uses_K=False`` get ``K=None``
and one cell per ``t``; an algorithm whose ``requires`` the problem's ``capabilities``
lack (e.g. stocbio needs ``"minibatch"``) is skipped for that problem, and
:func:`plan` reports it. ``expand`` is a generator: a 100,000-cell plan streams in about a
second and is never held in memory.
"""
from __future__ import annotations

import importlib
import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterator

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from hypersweep import algorithms as algorithm_registry
from hypersweep import problems as problem_registry
from hypersweep.orchestrator.cell import PIPELINES, Cell, canonical_json
from hypersweep.algorithms.params import check_algorithm_params
from hypersweep.pipelines.params import check_pipeline_params
from hypersweep.problems.base import DTYPES
from hypersweep.registry import BACKENDS
from hypersweep.validation import ParamsError

#: Algorithm kinds each pipeline accepts. A pipeline missing here accepts every kind.
PIPELINE_ALGORITHM_KINDS = {
    "hypergradient_error": ("estimator",),
    "hpo": ("estimator", "online"),
    "blackbox": ("searcher",),
}

# Ray keeps resource quantities in units of 1e-4 and rejects finer fractions.
_RAY_RESOURCE_PRECISION = 1e-4
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

#: A study file larger than this is refused before it is parsed (a real study is a few KiB).
MAX_STUDY_BYTES = 2**20
#: How many nodes YAML aliases may add to a study once expanded. PyYAML builds an aliased
#: value once and shares it, but validation and the canonical JSON of every cell walk the
#: expanded tree, so nine nested aliases ("billion laughs") would cost 10**9 visits.
MAX_ALIAS_NODES = 100_000
#: ``cell_timeout_s`` when the study does not set it (``null`` disables the timeout).
DEFAULT_CELL_TIMEOUT_S = 3600.0


class StudyError(ValueError):
    """A study file that cannot run; the message is one line naming the key path."""


# ---------------------------------------------------------------------------------------
# Small validators. Each raises a PydanticCustomError whose whole message is ours, so the
# final StudyError reads "<key path>: <message>". ``subpath`` extends the key path for
# checks made above the offending key (e.g. an unknown problem parameter).


def _fail(message: str, subpath: str = "") -> PydanticCustomError:
    return PydanticCustomError("hypersweep", "{message}", {"message": message,
                                                           "subpath": subpath})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _choices(values) -> str:
    return ", ".join(map(str, values))


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


def _no_duplicates(values: list, *, what: str = "") -> None:
    """Reject repeated values; ``what`` names the list in the message (``t[0]``)."""
    seen: dict = {}
    for index, value in enumerate(values):
        if value in seen:
            raise _fail(f"repeats {what}[{seen[value]}] ({value!r}); each value must appear "
                        "once", f"[{index}]")
        seen[value] = index


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
            units = value / _RAY_RESOURCE_PRECISION
            if abs(units - round(units)) > 1e-6:
                raise _fail(f"fractions must be multiples of {_RAY_RESOURCE_PRECISION:g} "
                            f"(Ray's resource precision), got {value!r}")
            if value > 1 and value != int(value):
                raise _fail(f"quantities above 1 must be whole numbers (Ray), got {value!r}")
        return float(value)

    return check


# ---------------------------------------------------------------------------------------
# The schema.


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
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise _fail(f"must be a mapping of parameter names to values, got {params!r}")
        return params

    def _allowed(self) -> dict:
        raise NotImplementedError

    def _registry_check(self) -> None:
        raise NotImplementedError

    @model_validator(mode="after")
    def _params_known(self):
        allowed = self._allowed()
        for key, value in self.params.items():
            if key not in allowed:
                raise _fail(f"unknown parameter for {self.kind} {self.name!r}. Valid choices: "
                            f"{_choices(sorted(allowed)) or '(none)'}", f".params.{key}")
            _check_json(value, f".params.{key}")
            if not _check_param_type(allowed[key], value):
                raise _fail(f"expected a value like the default {allowed[key]!r}, "
                            f"got {value!r}", f".params.{key}")
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


class AlgorithmEntry(_Entry):
    """One algorithm of the study and its extra keyword parameters (e.g. ``batch_size``)."""

    kind: ClassVar[str] = "algorithm"

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

    tracking_uri: str = "sqlite:///results/mlflow.db"
    experiment: str | None = None
    enabled: bool = True

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

    @field_validator("enabled", mode="before")
    @classmethod
    def _enabled(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _fail(f"must be true or false, got {value!r}")
        return value


class StudySpec(_Section):
    """A validated study. Field names are the YAML keys; see the module docstring.

    ``backend`` is normalized to a tuple, ``seeds`` to a tuple of ints, ``output`` to an
    absolute path (relative paths are taken from the working directory at load time) and
    ``mlflow.experiment`` to the study name when unset. ``source_text`` is the YAML as
    written, for the driver to log as an MLflow artifact.
    """

    internal_fields: ClassVar[tuple[str, ...]] = ("source_text", "source_path")

    study: str
    pipeline: str
    backend: tuple[str, ...]
    dtype: str = "float64"
    problems: tuple[Annotated[ProblemEntry, BeforeValidator(_entry(_problem_name))], ...]
    algorithms: tuple[Annotated[AlgorithmEntry, BeforeValidator(_entry(_algorithm_name))],
                      ...]
    t: tuple[Annotated[int, BeforeValidator(_int_at_least(1))], ...]
    K: tuple[Annotated[Any, BeforeValidator(_k_value)], ...] | None = None
    seeds: tuple[Annotated[int, BeforeValidator(_int_at_least(0))], ...] = (0,)
    pipeline_params: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    num_actors: Annotated[int | None, BeforeValidator(
        lambda v: None if v is None else _int_at_least(1)(v))] = None
    max_retries: Annotated[int, BeforeValidator(_int_at_least(0))] = 2
    #: Seconds one cell may run before it is recorded ``timeout`` and its actor restarted;
    #: default :data:`DEFAULT_CELL_TIMEOUT_S` (one hour), ``null`` for no limit.
    cell_timeout_s: Annotated[float | None, BeforeValidator(
        lambda v: None if v is None else _float_field(strict=True)(v))] = \
        DEFAULT_CELL_TIMEOUT_S
    output: str = ""
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    source_text: str = Field(default="", repr=False, exclude=True)
    source_path: str | None = Field(default=None, repr=False, exclude=True)

    # -- convenience views -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.study

    @property
    def backends(self) -> tuple[str, ...]:
        return self.backend

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or self.study

    def expand(self) -> Iterator[Cell]:
        return expand(self)

    # -- field checks ------------------------------------------------------------------
    @field_validator("study", mode="before")
    @classmethod
    def _study_name(cls, value: Any) -> str:
        if not isinstance(value, str) or not _STUDY_NAME.match(value):
            raise _fail("must be a name of letters, digits, '_', '.' or '-' (it names the "
                        f"MLflow experiment and the output), got {value!r}")
        return value

    @field_validator("pipeline", mode="before")
    @classmethod
    def _pipeline(cls, value: Any) -> str:
        if value not in PIPELINES:
            raise _fail(f"unknown pipeline {value!r}. Valid choices: {_choices(PIPELINES)}")
        return value

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, value: Any) -> tuple[str, ...]:
        values = _as_list(value, "backend")
        for index, item in enumerate(values):
            if item not in BACKENDS:
                subpath = f"[{index}]" if isinstance(value, (list, tuple)) else ""
                raise _fail(f"unknown backend {item!r}. Valid choices: {_choices(BACKENDS)}",
                            subpath)
        _no_duplicates(values, what="backend")
        return tuple(values)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> str:
        if value not in DTYPES:
            raise _fail(f"unknown dtype {value!r}. Valid choices: {_choices(DTYPES)}")
        return value

    @field_validator("problems", mode="before")
    @classmethod
    def _problems(cls, value: Any) -> list:
        return _as_list(value, "problem")

    @field_validator("algorithms", mode="before")
    @classmethod
    def _algorithms(cls, value: Any) -> list:
        return _as_list(value, "algorithm")

    @field_validator("t", mode="before")
    @classmethod
    def _t(cls, value: Any) -> list:
        values = _as_list(value, "t value")
        _no_duplicates(values, what="t")
        return values

    @field_validator("K", mode="before")
    @classmethod
    def _k(cls, value: Any) -> list | None:
        if value is None:
            return None
        values = _as_list(value, "K value")
        _no_duplicates(values, what="K")
        return values

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> list:
        if _is_int(value):  # an int n means range(n)
            if value < 1:
                raise _fail(f"an integer n means seeds 0..n-1 and must be >= 1, got {value}")
            return list(range(value))
        values = _as_list(value, "seed")
        _no_duplicates(values, what="seeds")
        return values

    @field_validator("pipeline_params", mode="before")
    @classmethod
    def _pipeline_params(cls, value: Any) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _fail(f"must be a mapping, got {value!r}")
        _check_json(value)
        return value

    @field_validator("output", mode="before")
    @classmethod
    def _output(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _fail(f"must be a directory path, got {value!r}")
        return value

    # -- checks across fields ----------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("output") is None and isinstance(
                data.get("study"), str):
            data = {**data, "output": f"results/{data['study']}"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "StudySpec":
        _no_duplicates_at("problems", self.problems)
        _no_duplicates_at("algorithms", self.algorithms)
        kinds = PIPELINE_ALGORITHM_KINDS.get(self.pipeline)
        for index, entry in enumerate(self.algorithms):
            algo = algorithm_registry.spec(entry.name)
            if kinds is not None and algo.kind not in kinds:
                fitting = [s.name for s in algorithm_registry.ALGORITHMS if s.kind in kinds]
                raise _fail(f"algorithm {entry.name!r} is of kind {algo.kind!r}; pipeline "
                            f"{self.pipeline!r} runs {' or '.join(kinds)} algorithms. "
                            f"Valid choices: {_choices(fitting) or '(none registered)'}",
                            f"algorithms[{index}]")
            if algo.uses_K and self.K is None:
                raise _fail(f"required: algorithm {entry.name!r} uses K (e.g. K: [10, t])",
                            "K")
        _check_params(self)
        if next(iter(expand(self)), None) is None:
            skipped = "; ".join(f"{s.problem} × {s.algorithm}: {s.reason}"
                                for s in skipped_combinations(self))
            raise _fail(f"the study expands to no cells ({skipped})", "algorithms")
        _check_data_files(self)
        output = Path(self.output).expanduser().absolute()
        _check_output(output)
        mlflow = self.mlflow
        if mlflow.experiment is None:
            mlflow = mlflow.model_copy(update={"experiment": self.study})
        return self.model_copy(update={"output": str(output), "mlflow": mlflow})


def _check_output(output: Path) -> None:
    """That the sweep will be able to create ``output`` and write in it, so that a bad
    path is one line now rather than a traceback after Ray has started.

    The first existing directory on the way up is probed with a real file (created and
    removed at once): ``os.access`` alone says yes to root on a read-only mount and knows
    nothing of pseudo file systems such as /proc or /sys. Nothing else is written.
    """
    if output.exists() and not output.is_dir():
        raise _fail(f"{str(output)!r} exists and is not a directory", "output")
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise _fail(f"{str(output)!r} cannot be created: {str(existing)!r} is not a "
                    "directory", "output")
    what = "is not writable" if existing == output else \
        f"cannot be created: {str(existing)!r} is not writable"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _fail(f"{str(output)!r} {what}", "output")
    try:
        handle, probe = tempfile.mkstemp(prefix=".hypersweep-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise _fail(f"{str(output)!r} {what} ({exc.strerror or exc})", "output") from None


def _check_params(study: StudySpec) -> None:
    """Algorithm ``params`` and ``pipeline_params`` by the models the cells check them with
    (:mod:`hypersweep.algorithms.params`, :mod:`hypersweep.pipelines.params`), then the
    checks that pair them with the study's algorithms and t values; every issue found goes
    into the one line."""
    issues: list[str] = []
    for index, entry in enumerate(study.algorithms):
        prefix = f"algorithms[{index}].params"
        try:
            checked = check_algorithm_params(entry.name, entry.params, prefix=prefix)
        except ParamsError as exc:
            issues.extend(exc.issues)
            continue
        if checked is not None:
            issues.extend(checked.study_issues(prefix=prefix, t_values=study.t))
    try:
        checked = check_pipeline_params(study.pipeline, study.pipeline_params)
    except ParamsError as exc:
        issues.extend(exc.issues)
    else:
        if checked is not None:
            for entry in study.algorithms:
                issues.extend(checked.algorithm_issues(entry.name))
    if issues:
        raise _fail("; ".join(dict.fromkeys(issues)))  # once each, in study order


def _check_data_files(study: StudySpec) -> None:
    """Build each problem that names a ``data:`` file once, in numpy, with the problem's own
    ``build`` (what every cell does before it runs), so that a missing, corrupt or
    ill-shaped file is one error here rather than an error row per cell. Cost: one read of
    each file and one numpy build; never torch, jax or Ray."""
    for index, entry in enumerate(study.problems):
        path = entry.params.get("data")
        if path is None:
            continue
        where = f"problems[{index}].params.data"
        if not isinstance(path, str) or not path.strip():
            raise _fail(f"must be the path of a .npz or .parquet file, got {path!r}", where)
        if not Path(path).is_file():
            raise _fail(f"data file {path!r} of problem {entry.name!r} does not exist "
                        f"(relative paths are read from {Path.cwd()})", where)
        if path.endswith(".npz") and not zipfile.is_zipfile(path):
            # numpy would blame pickled data (its guess for any file that is not a zip)
            raise _fail(f"problem {entry.name!r} cannot use data file {path!r}: it is not "
                        "an .npz archive (not a readable zip file)", where)
        merged = problem_registry.check_params(entry.name, entry.params)
        # as problems.make does: inner_lr and w_init are applied after build
        own = {k: v for k, v in merged.items() if k not in ("inner_lr", "w_init")}
        module = importlib.import_module(problem_registry.spec(entry.name).impl)
        try:
            module.build(seed=study.seeds[0], **own)
        except Exception as exc:  # noqa: BLE001 - whatever a user's file breaks is bad input
            reason = str(exc)
            for prefix in (f"data file {path!r}: ", f"{path}: "):
                reason = reason.removeprefix(prefix)
            if not isinstance(exc, ValueError):
                reason = f"{type(exc).__name__}: {reason}"
            raise _fail(f"problem {entry.name!r} cannot use data file {path!r}: {reason}",
                        where) from None


def _no_duplicates_at(key: str, entries) -> None:
    seen: dict = {}
    for index, entry in enumerate(entries):
        marker = (entry.name, entry.params_json)
        if marker in seen:
            raise _fail(f"repeats {key}[{seen[marker]}] ({entry.label}); list each "
                        "(name, params) once", f"{key}[{index}]")
        seen[marker] = index


# ---------------------------------------------------------------------------------------
# Loading.


class _StudyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus two traps: duplicate keys are errors (PyYAML keeps the
    last silently) and ``1e-4`` is a float (YAML 1.1 wants ``1.0e-4``)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_aliases(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # unhashable; the base constructor reports it
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first set on line {first})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return []


def _check_aliases(root) -> None:
    """Refuse a composed document whose aliases expand it by more than
    :data:`MAX_ALIAS_NODES` nodes, or that refers to itself. An alias is the very node
    object of its anchor, so the expanded size is counted over the distinct nodes (each
    once, children before parents, without recursion): linear in the document, however
    many times its aliases multiply it."""
    # Keyed by the node objects themselves (yaml nodes hash by identity, and the dict keeps
    # them alive): an alias *is* its anchor's node object, so it is counted once.
    sizes: dict[Any, int] = {}
    on_path: set[Any] = set()  # the ancestors of the node being expanded
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        key = node
        if leaving:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[child] for child in _children(node))
            continue
        if key in sizes:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if child in on_path:
                line = child.start_mark.line + 1
                raise StudyError(f"YAML alias refers to a value that contains it (anchored "
                                 f"on line {line}); a study cannot be recursive")
            if child not in sizes:
                stack.append((child, False))
    extra = sizes[root] - len(sizes)
    if extra > MAX_ALIAS_NODES:
        amount = f"{extra:,}" if extra < 10**12 else f"about 10^{len(str(extra)) - 1}"
        raise StudyError(f"YAML aliases expand the study by {amount} nodes, more than the "
                         f"limit of {MAX_ALIAS_NODES:,} (an alias bomb?); write the values "
                         "out or use fewer nested aliases")


def _path_text(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _study_error(exc: ValidationError) -> StudyError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    ctx = first.get("ctx") or {}
    path = _path_text(tuple(first["loc"])) + ctx.get("subpath", "")
    path = path.lstrip(".")
    if first["type"] == "missing":
        message = "required key is missing"
    elif first["type"] == "extra_forbidden":  # only when the before-check was bypassed
        message = "unknown key"
    else:
        message = first["msg"]
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" \
        if len(errors) > 1 else ""
    return StudyError(_one_line(f"{path}: {message}{more}" if path else f"{message}{more}"))


def parse_study(text: str, *, source: str = "<string>") -> StudySpec:
    """Validate the YAML ``text`` of a study; ``source`` names it in error messages.

    Bounded: a text over :data:`MAX_STUDY_BYTES` or whose aliases would expand it by more
    than :data:`MAX_ALIAS_NODES` nodes is refused before anything walks it."""
    if len(text) > MAX_STUDY_BYTES or len(text.encode("utf-8")) > MAX_STUDY_BYTES:
        raise StudyError(_too_big(len(text.encode("utf-8"))))
    try:
        data = yaml.load(text, Loader=_StudyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise StudyError("the YAML nests too deeply to be a study") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise StudyError(_one_line(f"malformed YAML{where}: {detail}")) from None
    if data is None:
        raise StudyError(f"the study is empty; it needs the keys "
                         f"{_choices(StudySpec.user_keys())}")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise _study_error(exc) from None
    return spec.model_copy(update={"source_text": text, "source_path": source})


def _too_big(size: int | None) -> str:
    what = f"is {size:,} bytes," if size else "is"
    return (f"the study {what} more than the limit of {MAX_STUDY_BYTES:,} bytes "
            "(1 MiB); a study names its data files rather than holding data")


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study YAML file. Raises :class:`StudyError` (one line).

    At most :data:`MAX_STUDY_BYTES` + 1 bytes are read, so a huge file (or /dev/zero)
    costs nothing."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_STUDY_BYTES + 1)
        if len(raw) > MAX_STUDY_BYTES:
            size = path.stat().st_size if path.is_file() else None
            raise StudyError(f"{path}: {_too_big(size)}")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise StudyError(f"study file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyError(_one_line(f"cannot read study file {str(path)!r}: {exc}")) from None
    try:
        return parse_study(text, source=str(path))
    except StudyError as exc:
        raise StudyError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------
# Expansion.


@dataclass(frozen=True)
class Skip:
    """A (problem, algorithm[, backend]) combination the study names but cannot run."""

    problem: str
    algorithm: str
    backend: str | None
    reason: str


@dataclass(frozen=True)
class PairCount:
    problem: str
    algorithm: str
    cells: int


def _k_values(k_spec: tuple | None, t: int, uses_K: bool
              ) -> list[tuple[int | None, str | None]]:
    """(K, K_setting) of one t, in study order: ``"t"`` resolves to (t, "t"), an integer k
    to (k, "k"). ``K: [10, t]`` at t = 10 gives two cells, one per line (same numbers,
    each line whole in Parquet and MLflow)."""
    if not uses_K:
        return [(None, None)]
    return [(t, "t") if k == "t" else (k, str(k)) for k in (k_spec or ())]


def _label(entry, entries) -> str:
    """The entry's name, plus its params when the study lists the name more than once."""
    if sum(other.name == entry.name for other in entries) == 1:
        return entry.name
    return entry.label


def _runnable(study: StudySpec, problem: ProblemEntry, algorithm: AlgorithmEntry):
    """(backends this pair runs on, skips). Only ``requires`` and missing impls skip."""
    problem_label = _label(problem, study.problems)
    algorithm_label = _label(algorithm, study.algorithms)
    algo = algorithm_registry.spec(algorithm.name)
    capabilities = problem_registry.spec(problem.name).capabilities
    missing = algo.requires - frozenset(capabilities)
    if missing:
        return [], [Skip(problem_label, algorithm_label, None,
                         f"{algorithm.name} requires {', '.join(sorted(missing))}, "
                         f"which {problem.name} lacks")]
    backends, skips = [], []
    for backend in study.backend:
        if backend in algo.impls:
            backends.append(backend)
        else:
            skips.append(Skip(problem_label, algorithm_label, backend,
                              f"{algorithm.name} has no {backend} implementation"))
    return backends, skips


def skipped_combinations(study: StudySpec) -> list[Skip]:
    """Every combination the study names that ``expand`` leaves out, with the reason."""
    skips: list[Skip] = []
    for problem in study.problems:
        for algorithm in study.algorithms:
            skips.extend(_runnable(study, problem, algorithm)[1])
    return skips


def expand(study: StudySpec) -> Iterator[Cell]:
    """Yield the study's cells in the order problems × algorithms × backends × t × K × seeds.

    Deterministic (same study, same cells and cell_ids). Cost: one small JSON encoding and
    a blake2b hash per cell, no memory beyond the current cell.
    """
    pipeline_json = canonical_json(study.pipeline_params)
    for problem in study.problems:
        problem_json = problem.params_json
        for algorithm in study.algorithms:
            backends, _ = _runnable(study, problem, algorithm)
            uses_K = algorithm_registry.spec(algorithm.name).uses_K
            algorithm_json = algorithm.params_json
            for backend in backends:
                for t in study.t:
                    for K, K_setting in _k_values(study.K, t, uses_K):
                        for seed in study.seeds:
                            yield Cell(study=study.study, pipeline=study.pipeline,
                                       problem=problem.name, algorithm=algorithm.name,
                                       backend=backend, t=t, K=K, K_setting=K_setting,
                                       seed=seed,
                                       dtype=study.dtype, problem_params=problem_json,
                                       algorithm_params=algorithm_json,
                                       pipeline_params=pipeline_json)


def pair_counts(study: StudySpec) -> list[PairCount]:
    """Cells per (problem, algorithm), counted without expanding; skipped pairs give 0."""
    counts = []
    for problem in study.problems:
        for algorithm in study.algorithms:
            backends, _ = _runnable(study, problem, algorithm)
            uses_K = algorithm_registry.spec(algorithm.name).uses_K
            per_backend = sum(len(_k_values(study.K, t, uses_K)) for t in study.t)
            counts.append(PairCount(_label(problem, study.problems),
                                    _label(algorithm, study.algorithms),
                                    len(backends) * per_backend * len(study.seeds)))
    return counts


def count_cells(study: StudySpec) -> int:
    """``len(list(expand(study)))`` without building the cells."""
    return sum(pair.cells for pair in pair_counts(study))


@dataclass(frozen=True)
class Plan:
    """What ``hypersweep plan`` shows."""

    total: int
    pairs: list[PairCount]
    skipped: list[Skip]
    sample_cell_ids: list[str]


def plan(study: StudySpec, *, sample_size: int = 10) -> Plan:
    """Expand the whole study once (checking that cell_ids are unique) and summarize it.

    The sample is spread evenly over the expansion order. Cost: one pass over the cells.
    """
    total = count_cells(study)
    stride = max(1, total // max(1, sample_size))
    sample, seen, n = [], set(), 0
    for n, cell in enumerate(expand(study), start=1):
        if cell.cell_id in seen:
            raise StudyError(f"two cells share the id {cell.cell_id!r}; this is a bug in "
                             "the expansion, please report it")
        seen.add(cell.cell_id)
        if (n - 1) % stride == 0 and len(sample) < sample_size:
            sample.append(cell.cell_id)
    if n != total:
        raise StudyError(f"count_cells says {total} cells but expansion gave {n}; this is "
                         "a bug, please report it")
    return Plan(total, pair_counts(study), skipped_combinations(study), sample)


__all__ = ["StudySpec", "StudyError", "ProblemEntry", "AlgorithmEntry", "Resources",
           "MlflowConfig", "load_study", "parse_study", "expand", "count_cells",
           "pair_counts", "skipped_combinations", "plan", "Plan", "Skip", "PairCount",
           "PIPELINE_ALGORITHM_KINDS"]
