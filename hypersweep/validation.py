"""The shared pieces of the parameter schemas: :class:`ParamsError`, the field checks and
the :class:`Params` base model.

Two modules hold the models: :mod:`hypersweep.algorithms.params` (an algorithm's
``params``) and :mod:`hypersweep.pipelines.params` (a pipeline's ``pipeline_params``);
the catalogs name them (``params_model="module:Class"``). Each model is read twice: by the
study validator (:mod:`hypersweep.orchestrator.spec`) when ``hypersweep plan`` or ``run``
loads a study, before Ray starts, and inside every cell, so what plan accepts and what a
cell accepts cannot drift apart.

Validation reports every bad key at once, as :class:`ParamsError`: a ``ValueError`` whose
message is one line, the issues joined by ``"; "``, each naming its key path and the valid
range or choices (``pipeline_params.outer_lr must be a finite number > 0, got 0``).

Checks that need more than the mapping itself — the study's algorithms (hpo's
``warm_start_v``) or its t values (ASHA's ``grace_period``) — are methods returning issue
strings, called by the spec at plan time and by the pipeline at run time.

Imports neither torch nor jax (nor Ray).
"""
from __future__ import annotations

import difflib
import math
from typing import Annotated, Any, ClassVar, Iterable, Mapping

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError


class ParamsError(ValueError):
    """Bad parameters. ``issues``: one message per bad key; ``str()`` joins them by "; "."""

    def __init__(self, issues: Iterable[str]):
        self.issues = tuple(issues)
        super().__init__("; ".join(self.issues))


# ---------------------------------------------------------------------------------------
# Field checks. Each returns the value unchanged (no coercion: the cell_id hashes the
# study's own values) or raises with the whole predicate: "must be ..., got ...".


def bad(message: str, subpath: str = "") -> PydanticCustomError:
    """``subpath`` extends the key path below the field (``space.ridge.low``)."""
    return PydanticCustomError("hypersweep_param", "{message}",
                               {"message": message, "subpath": subpath})


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def integer(minimum: int, *, nullable: bool = False, why: str = ""):
    def check(value: Any) -> Any:
        if value is None and nullable:
            return value
        if not is_int(value) or value < minimum:
            null = " or null" if nullable else ""
            raise bad(f"must be an integer >= {minimum}{null}{why}, got {value!r}")
        return value
    return check


def number(*, above: float | None = None, low: float | None = None,
           high: float | None = None, nullable: bool = False):
    """A finite number ``> above`` or ``>= low`` (either or neither), and ``<= high``."""
    parts = []
    if above is not None:
        parts.append(f"> {above:g}")
    if low is not None:
        parts.append(f">= {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
    if low is not None and high is not None and above is None:
        what = f"a number in [{low:g}, {high:g}]"
    elif parts:
        what = "a finite number " + " and ".join(parts)
    else:
        what = "a finite number"

    def check(value: Any) -> Any:
        if value is None and nullable:
            return value
        ok = is_number(value) and (above is None or value > above) and (
            low is None or low <= value) and (high is None or value <= high)
        if not ok:
            raise bad(f"must be {what}{' or null' if nullable else ''}, got {value!r}")
        return value
    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad(f"must be true or false, got {value!r}")
    return value


def one_of(choices: Iterable[str]):
    choices = tuple(choices)

    def check(value: Any) -> str:
        if value not in choices:
            raise bad(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def is_numbers(value: Any) -> bool:
    """A finite number, or a non-empty (nested) list of them: λ in any shape."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(is_numbers(item) for item in value)
    return is_number(value)


def field(check):
    """A field whose whole check is ``check`` (the value is kept as the study wrote it)."""
    return Annotated[Any, BeforeValidator(check)]


# ---------------------------------------------------------------------------------------
# The base model.


class Params(BaseModel):
    """Frozen; unknown keys are errors. ``owner`` names it in messages ("pipeline 'hpo'")."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    owner: ClassVar[str] = ""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {name: info.default for name, info in cls.model_fields.items()}

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
