"""Study YAML -> frozen :class:`StudySpec`, validated whole before anything runs.

``load_study`` either returns a frozen spec or raises :class:`StudyError` whose message is
one line naming the key path, the offending value and the valid choices. Validation never
imports torch, jax or Ray and never writes anything. It covers ``pipeline_params`` and
algorithm ``params``, checked by the same models the cells use (the catalogs'
``params_model``), and each problem's ``data:`` file, which is read and built once in numpy
(:mod:`.checks`); the sections a study is made of are in :mod:`.fields`, and what it
expands to (cells, counts, the plan) in :mod:`.expand`. The YAML is read bounded: size,
alias expansion, duplicate keys.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Sequence

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from hypersweep import algorithms as algorithm_registry
from hypersweep.orchestrator import checks
from hypersweep.orchestrator.fields import (AlgorithmEntry, Batching, CompileCache,
                                            MlflowConfig,
                                            ProblemEntry, Resources, _algorithm_name, _as_list,
                                            _choices, _entry, _fail,
                                            _float_field, _int_at_least, _is_int,
                                            _k_value, _mapping, _no_duplicates,
                                            _problem_name, _Section, json_mapping,
                                            k_grid, t_grid)
from hypersweep.pipelines.catalog import PIPELINES
from hypersweep.problems.base import DTYPES
from hypersweep.registry import BACKENDS

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


class StudySpec(_Section):
    """A validated study. Field names are the YAML keys; see the module docstring.

    ``backend`` is normalized to a tuple, ``seeds`` to a tuple of ints, ``output`` to an
    absolute path (relative paths are taken from the working directory at load time) and
    ``mlflow.experiment`` to the study name when unset. ``source_text`` is the YAML as
    written, for the driver to log as an MLflow artifact.

    ``batching: {max_cells: 64, max_cost: 200000}``: for a pipeline with ``run_batch``,
    the driver sends up to ``max_cells`` cells that differ only in t, K and seed as one
    task, while their expected costs (the pipeline's ``cost``, else t + K oracle calls)
    sum to at most ``max_cost``; ``max_cells: 1`` sends every cell alone.
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
    #: JAX's persistent compilation cache for the actors: ``{enabled: true, dir: null}``.
    compile_cache: CompileCache = Field(default_factory=CompileCache)
    #: Cells sent as one task (pipelines with ``run_batch``): ``{max_cells, max_cost}``.
    batching: Batching = Field(default_factory=Batching)
    source_text: str = Field(default="", repr=False, exclude=True)
    source_path: str | None = Field(default=None, repr=False, exclude=True)

    # -- per-algorithm settings ----------------------------------------------------------
    def t_for(self, entry: AlgorithmEntry) -> tuple[int, ...]:
        """The t grid of ``entry``'s cells: its own ``t`` if set, else the study's."""
        return entry.t if entry.t is not None else self.t

    def K_for(self, entry: AlgorithmEntry) -> tuple | None:
        """The K grid of ``entry``'s cells: its own ``K`` if set, else the study's."""
        return entry.K if entry.K is not None else self.K

    def pipeline_params_for(self, entry: AlgorithmEntry) -> dict[str, Any]:
        """The study's ``pipeline_params`` with ``entry``'s overrides merged over them."""
        return {**self.pipeline_params, **entry.pipeline_params}

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
            raise _fail(f"unknown pipeline {value!r}. Valid choices: "
                        f"{_choices(PIPELINES.names())}")
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
        return t_grid(value)

    @field_validator("K", mode="before")
    @classmethod
    def _k(cls, value: Any) -> list | None:
        return None if value is None else k_grid(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> list:
        if _is_int(value):  # an int n means range(n)
            if value < 1:
                raise _fail(f"an integer n means seeds 0..n-1 and must be >= 1, got {value}")
            return list(range(value))
        return _no_duplicates(_as_list(value, "seed"), what="seeds")

    @field_validator("pipeline_params", mode="before")
    @classmethod
    def _pipeline_params(cls, value: Any) -> dict:
        return json_mapping(value)

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
        from hypersweep.orchestrator.expand import expand, skipped_combinations

        checks.no_duplicates_at("problems", self.problems)
        checks.no_duplicates_at("algorithms", self.algorithms)
        kinds = PIPELINES.spec(self.pipeline).algorithm_kinds
        for index, entry in enumerate(self.algorithms):
            algo = algorithm_registry.spec(entry.name)
            if algo.kind not in kinds:
                fitting = [s.name for s in algorithm_registry.ALGORITHMS if s.kind in kinds]
                raise _fail(f"algorithm {entry.name!r} is of kind {algo.kind!r}; pipeline "
                            f"{self.pipeline!r} runs {' or '.join(kinds)} algorithms. "
                            f"Valid choices: {_choices(fitting) or '(none registered)'}",
                            f"algorithms[{index}]")
            if algo.uses_K and self.K_for(entry) is None:
                raise _fail(f"required: algorithm {entry.name!r} uses K (e.g. K: [10, t])",
                            "K")
            if not algo.uses_K and entry.K is not None:
                raise _fail(f"algorithm {entry.name!r} takes no K; remove its K",
                            f"algorithms[{index}].K")
        checks.check_params(self)
        if next(iter(expand(self)), None) is None:
            skipped = "; ".join(f"{s.problem} × {s.algorithm}: {s.reason}"
                                for s in skipped_combinations(self))
            raise _fail(f"the study expands to no cells ({skipped})", "algorithms")
        checks.check_data_files(self)
        output = Path(self.output).expanduser().absolute()
        checks.check_output(output)
        mlflow = self.mlflow
        if mlflow.experiment is None:
            mlflow = mlflow.model_copy(update={"experiment": self.study})
        return self.model_copy(update={"output": str(output), "mlflow": mlflow})


# ---------------------------------------------------------------------------------------
# Loading: bounded YAML.


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
    """Every validation error of the study in one line, ``path: message`` each, joined by
    "; " (pydantic reports the fields independently, so a study with three bad keys shows
    all three at once)."""
    parts = []
    for error in exc.errors(include_url=False):
        ctx = error.get("ctx") or {}
        path = (_path_text(tuple(error["loc"])) + ctx.get("subpath", "")).lstrip(".")
        if error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] == "extra_forbidden":  # only when the before-check was bypassed
            message = "unknown key"
        else:
            message = error["msg"]
        parts.append(f"{path}: {message}" if path else message)
    return StudyError(_one_line("; ".join(dict.fromkeys(parts))))


def apply_overrides(data: Any, overrides: Sequence[str]) -> Any:
    """``data`` (the parsed YAML) with each ``KEY=VALUE`` of ``overrides`` set, in order:
    KEY a dotted path (``pipeline_params.outer_lr``, ``algorithms.1.params.batch_size``; an
    integer part indexes a list), VALUE parsed as YAML (``0.5``, ``[10, t]``,
    ``{enabled: false}``). Missing mapping keys are created; the result is validated as if
    the file said it. A malformed override is a one-line :class:`StudyError`."""
    if not overrides:
        return data
    data = {} if data is None else data
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise StudyError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. "
                             f"pipeline_params.outer_lr=0.5")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise StudyError(f"--set {key}: the value {raw!r} is not valid YAML") from None
        node = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise StudyError(f"--set {key}: {where!r} needs an index below "
                                     f"{len(node)} (that key holds a list)")
                if last:
                    node[int(part)] = value
                else:
                    if isinstance(node[int(part)], str):  # a bare name: {name: ...}
                        node[int(part)] = {"name": node[int(part)]}
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise StudyError(f"--set {key}: {'.'.join(parts[:depth])!r} holds "
                                 f"{node!r}, not a mapping or a list")
    return data


def parse_study(text: str, *, source: str = "<string>",
                overrides: Sequence[str] = ()) -> StudySpec:
    """Validate the YAML ``text`` of a study; ``source`` names it in error messages;
    ``overrides`` (``KEY=VALUE``, :func:`apply_overrides`) are applied before validation,
    and the study's ``source_text`` is then the YAML with them (what the output's
    study.yaml and MLflow keep, so a resume or ``status`` sees the same plan).

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
    if overrides:
        data = apply_overrides(data, overrides)
        text = (f"# with --set {' '.join(overrides)}\n"
                + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
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


def load_study(path: str | Path, *, overrides: Sequence[str] = ()) -> StudySpec:
    """Read and validate a study YAML file (with ``overrides``, :func:`apply_overrides`).
    Raises :class:`StudyError` (one line).

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
        return parse_study(text, source=str(path), overrides=overrides)
    except StudyError as exc:
        raise StudyError(f"{path}: {exc}") from None
