"""Study output directories read as pandas DataFrames for the report."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from hypersweep.io import parquet


def read_output(output_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, traces) of one study output directory as DataFrames.

    Results: the latest row per ``cell_id`` (by ``finished_at``), via
    :func:`hypersweep.io.parquet.read_results`. Traces: every trace row, keeping the
    last-written row per (cell_id, step) — a re-run cell's newer part files sort after
    the older ones (names start with a nanosecond clock).
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        raise ValueError(f"results directory {str(directory)!r} does not exist")
    results = parquet.read_results(directory).to_pandas()
    traces = parquet.read_traces(directory).to_pandas()
    if len(traces):
        traces = traces.drop_duplicates(["cell_id", "step"], keep="last")
    results = results.assign(output_dir=str(directory))
    return results.reset_index(drop=True), traces.reset_index(drop=True)


def read_outputs(dirs: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, traces) of several output directories; a cell present in two of them
    keeps its latest row."""
    parts = [read_output(d) for d in dirs]
    results = pd.concat([p[0] for p in parts], ignore_index=True)
    traces = pd.concat([p[1] for p in parts], ignore_index=True)
    if len(results):
        results = results.sort_values("finished_at").drop_duplicates("cell_id", keep="last")
    return results.reset_index(drop=True), traces


def as_frame(table) -> pd.DataFrame:
    """A DataFrame from a DataFrame, a pyarrow Table or a list of row dicts."""
    if isinstance(table, pd.DataFrame):
        return table
    if hasattr(table, "to_pandas"):
        return table.to_pandas()
    return pd.DataFrame(list(table))
