"""Whole-study checks that look beyond one field: algorithm ``params`` and
``pipeline_params`` by their models, each problem's ``data:`` file (built once in numpy),
repeated entries, and that the output directory can be written. Called by
:class:`~.spec.StudySpec`'s validator; never imports torch, jax or Ray, never writes
anything but a probe file it removes at once.
"""
from __future__ import annotations

import importlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from hypersweep import problems as problem_registry
from hypersweep.algorithms.params import check_algorithm_params
from hypersweep.orchestrator.fields import _fail
from hypersweep.pipelines.params import check_pipeline_params
from hypersweep.validation import ParamsError

if TYPE_CHECKING:
    from hypersweep.orchestrator.spec import StudySpec


def check_output(output: Path) -> None:
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


def check_params(study: "StudySpec") -> None:
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
            issues.extend(checked.study_issues(prefix=prefix, t_values=study.t_for(entry)))
    try:
        checked = check_pipeline_params(study.pipeline, study.pipeline_params)
    except ParamsError as exc:
        issues.extend(exc.issues)
    else:
        for index, entry in enumerate(study.algorithms):
            if entry.pipeline_params:  # the merged set, named at the entry's overrides
                prefix = f"algorithms[{index}].pipeline_params"
                try:
                    own = check_pipeline_params(study.pipeline,
                                                study.pipeline_params_for(entry),
                                                prefix=prefix)
                except ParamsError as exc:
                    issues.extend(exc.issues)
                    continue
            else:
                own = checked
            if own is not None:
                issues.extend(own.algorithm_issues(entry.name))
    if issues:
        raise _fail("; ".join(dict.fromkeys(issues)))  # once each, in study order


def check_data_files(study: "StudySpec") -> None:
    """Build each problem that names a ``data:`` file once, in numpy, with the problem's own
    ``build`` (what every cell does before it runs), so that a missing, corrupt or
    ill-shaped file is one error here rather than an error row per cell: a malformed
    svmlight file is named with its bad line (:mod:`hypersweep.problems.datasets`).
    ``data`` is a path (a file, or a directory such as MNIST's IDX files) or a mapping of
    split names to svmlight paths. Cost: one read of each file and one numpy build; never
    torch, jax or Ray."""
    for index, entry in enumerate(study.problems):
        path = entry.params.get("data")
        if path is None:
            continue
        where = f"problems[{index}].params.data"
        if isinstance(path, dict):
            # svmlight {train: …, val: …[, test: …]} (or another mapping a problem reads)
            if not path or not all(isinstance(p, str) and p.strip() for p in path.values()):
                raise _fail("a mapping must map split names to file paths, got "
                            f"{path!r}", where)
            for key, one in path.items():
                if not Path(one).exists():
                    raise _fail(f"data file {one!r} ({key}) of problem {entry.name!r} does "
                                f"not exist (relative paths are read from {Path.cwd()})",
                                where)
            what = "data files " + ", ".join(f"{k}={v!r}" for k, v in path.items())
        elif not isinstance(path, str) or not path.strip():
            raise _fail("must be the path of a data file (.npz, .parquet, svmlight .svm/"
                        ".libsvm/.svmlight/.txt[.bz2]) or a mapping of svmlight files "
                        f"(train, val[, test]), got {path!r}", where)
        elif not Path(path).exists():
            raise _fail(f"data file {path!r} of problem {entry.name!r} does not exist "
                        f"(relative paths are read from {Path.cwd()})", where)
        elif path.endswith(".npz") and not zipfile.is_zipfile(path):
            # numpy would blame pickled data (its guess for any file that is not a zip)
            raise _fail(f"problem {entry.name!r} cannot use data file {path!r}: it is not "
                        "an .npz archive (not a readable zip file)", where)
        else:
            what = f"data file {path!r}"
        merged = problem_registry.check_params(entry.name, entry.params)
        # as problems.make does: inner_lr and w_init are applied after build
        own = {k: v for k, v in merged.items() if k not in ("inner_lr", "w_init")}
        module = importlib.import_module(problem_registry.spec(entry.name).impl)
        try:
            module.build(seed=study.seeds[0], **own)
        except Exception as exc:  # noqa: BLE001 - whatever a user's file breaks is bad input
            reason = str(exc)
            # the spec is named once; a mapping's one bad file stays named in the reason
            prefixes = ((f"data file {path!r}: ", f"{path}: ") if isinstance(path, str) else
                        (", ".join(f"{k}={v}" for k, v in path.items()) + ": ",))
            for prefix in prefixes:
                reason = reason.removeprefix(prefix)
            if not isinstance(exc, ValueError):
                reason = f"{type(exc).__name__}: {reason}"
            raise _fail(f"problem {entry.name!r} cannot use {what}: {reason}",
                        where) from None


def no_duplicates_at(key: str, entries) -> None:
    seen: dict = {}
    for index, entry in enumerate(entries):
        marker = (entry.name, entry.params_json, getattr(entry, "overrides_json", ""))
        if marker in seen:
            raise _fail(f"repeats {key}[{seen[marker]}] ({entry.label}); list each "
                        "(name, params) once", f"{key}[{index}]")
        seen[marker] = index
