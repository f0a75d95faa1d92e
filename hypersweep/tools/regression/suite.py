"""The regression suite and its baseline: load the suite (completed from the catalogs),
run it, read and write the baseline Parquet file.

The suite file (``configs/regression.yaml``) is a normal study; the instances it lists fix
the cell_ids the committed baseline is keyed by. :func:`load_suite` adds every registered
problem the file does not list (on its ``ProblemSpec.small`` instance) and every estimator
it does not list (with its defaults), so a problem or estimator is in the gate from the
moment it is registered: its cells are reported as new (not compared) until the baseline
is regenerated with ``--update-baseline``. ``complete=False`` (``--listed-only``) runs the
listed ones only.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import socket
import time
import uuid
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from hypersweep import __version__
from hypersweep.io import parquet
from hypersweep.io.schema import RESULT_SCHEMA
from hypersweep.tools.regression.rules import GateInputError

log = logging.getLogger(__name__)

BASELINE_METADATA_KEY = b"hypersweep.baseline"
SUITE_PIPELINE = "hypergradient_error"


# ---------------------------------------------------------------------------------------
# The suite


def _names(entries) -> set[str]:
    return {e if isinstance(e, str) else (e or {}).get("name") for e in entries or []}


def complete_from_catalogs(raw: dict) -> tuple[dict, list[str]]:
    """``raw`` (a parsed suite YAML) with every registered problem and estimator it does
    not list appended, and the names added."""
    from hypersweep import algorithms, problems

    raw = dict(raw)
    added = []
    problem_entries = list(raw.get("problems") or [])
    listed = _names(problem_entries)
    for name in problems.names():
        if name not in listed:
            problem_entries.append({"name": name, "params": dict(problems.spec(name).small)})
            added.append(name)
    algorithm_entries = list(raw.get("algorithms") or [])
    listed = _names(algorithm_entries)
    for name in algorithms.names("estimator"):
        if name not in listed:
            algorithm_entries.append(name)
            added.append(name)
    raw["problems"], raw["algorithms"] = problem_entries, algorithm_entries
    return raw, added


def load_suite(path: str | Path, *, output: str | Path | None = None,
               num_cpus: float | None = None, num_gpus: float | None = None,
               complete: bool = True):
    """The suite study, completed from the catalogs unless ``complete`` is false (module
    docstring), its ``output`` set to a fresh ``<output>/run-<UTC time>-<id>`` (``output``
    defaults to the suite's own) and its resources optionally overridden."""
    from hypersweep.orchestrator.spec import StudyError, load_study, parse_study

    try:
        study = load_study(path)
        raw, added = {}, []
        if complete:
            raw, added = complete_from_catalogs(yaml.safe_load(study.source_text))
        if added:
            log.info("regression suite: %s not in %s, added from the catalogs",
                     ", ".join(added), path)
            study = parse_study(yaml.safe_dump(raw, sort_keys=False), source=str(path))
    except StudyError as exc:
        raise GateInputError(str(exc)) from None
    if study.pipeline != SUITE_PIPELINE:
        raise GateInputError(f"{path}: pipeline must be {SUITE_PIPELINE!r} for the "
                             f"regression gate, got {study.pipeline!r}")
    update: dict = {"output": str(_run_dir(output or study.output))}
    if num_cpus is not None or num_gpus is not None:
        resources = study.resources.model_dump()
        if num_cpus is not None:
            resources["num_cpus"] = num_cpus
        if num_gpus is not None:
            resources["num_gpus"] = num_gpus
        try:
            update["resources"] = type(study.resources).model_validate(resources)
        except ValueError as exc:
            raise GateInputError(f"resources: {' '.join(str(exc).split())}") from None
    return study.model_copy(update=update)


def _run_dir(output: str | Path) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(output).expanduser().absolute() / f"run-{stamp}-{uuid.uuid4().hex[:6]}"


def run_in_process(study) -> dict:
    """Run every cell of ``study`` here, one after another; rows go to Parquet under
    ``study.output`` like the driver's. Returns {status: count}."""
    from hypersweep.orchestrator import expand
    from hypersweep.orchestrator.cell import run_cell

    output = Path(study.output)
    sink = parquet.ParquetSink(output)
    parquet.write_text_atomic(output / parquet.STUDY_FILE, study.source_text)
    total = expand.count_cells(study)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    for index, cell in enumerate(expand.expand(study), start=1):
        row, traces = run_cell(cell)
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        sink.add(row, traces)
        if sink.due():
            sink.flush()
        if index % 25 == 0 or index == total:
            log.info("regression suite: %d/%d cells, %.1f s", index, total,
                     time.perf_counter() - start)
    sink.flush()
    return counts


def run_suite(study, *, executor: str = "inprocess", address: str | None = None):
    """Run the suite's cells; return the result table (latest row per cell)."""
    if executor == "ray":
        from hypersweep.orchestrator.driver import run_study

        run_study(study, address=address, quiet=True)
    else:
        run_in_process(study)
    return parquet.read_results(study.output)


# ---------------------------------------------------------------------------------------
# The baseline file


def read_baseline(path: str | Path) -> tuple[pa.Table, dict]:
    """The baseline rows and the metadata stored with them (who made it, when, versions)."""
    path = Path(path)
    if not path.is_file():
        raise GateInputError(f"baseline {str(path)!r} not found; create it with "
                             "--update-baseline")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise GateInputError(f"cannot read baseline {str(path)!r}: {exc}") from None
    raw = (table.schema.metadata or {}).get(BASELINE_METADATA_KEY)
    info = json.loads(raw) if raw else {}
    return table, info


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def write_baseline(table: pa.Table, path: str | Path, *, suite: str) -> dict:
    """Write ``table`` (sorted by cell_id) atomically, with provenance in its metadata."""
    path = Path(path)
    info = {
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": socket.gethostname(),
        "suite": str(suite),
        "hypersweep_version": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": _package_version("torch"),
        "jax": _package_version("jax"),
        "cells": table.num_rows,
    }
    ordered = table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA).sort_by("cell_id")
    ordered = ordered.replace_schema_metadata(
        {BASELINE_METADATA_KEY: json.dumps(info, sort_keys=True).encode()})
    # a complete, fsynced part beside the baseline, then one rename over it
    part = parquet.write_table_atomic(ordered, path.parent)
    os.replace(part, path)
    return info
