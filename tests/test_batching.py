"""Batched cells (issue 11): cells of one ``batch_key`` sent to an actor as one task.

Without Ray: the feed's choice of cells (max_cells, max_cost, batch_key, retries alone),
``run_cells`` (one row per cell whatever ``run_batch`` does) and the ``batching`` section
at ``hypersweep plan``. On a real local Ray, with the test pipeline ``sweep_test_batch``
(tests/sweep_test_pipeline.py): a diverging, a crashing and a hanging cell inside a batch,
a ``run_batch`` that raises, and a sweep of more cells than several Parquet flushes,
each read back exactly once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import sweep_test_pipeline
from hypersweep.io import parquet
from hypersweep.orchestrator import driver
from hypersweep.orchestrator.cell import Cell, canonical_json, run_cell, run_cells
from hypersweep.orchestrator.feed import BatchPolicy, Feed

ROOT = Path(__file__).resolve().parents[1]


def _cells(seeds, params: dict | None = None, *, t=(1,), K=(None,), algorithm="probe",
           pipeline="sweep_test_batch", backend="none", study="batching") -> list[Cell]:
    return [Cell(study=study, pipeline=pipeline, problem="toy", algorithm=algorithm,
                 backend=backend, t=t_, K=k, seed=seed,
                 pipeline_params=canonical_json(params or {}))
            for t_ in t for k in K for seed in seeds]


def _extra(row: dict) -> dict:
    return json.loads(row["extra"]) if row["extra"] else {}


# --- the feed, without Ray ---------------------------------------------------------------


def _policy(max_cells=64, max_cost=float("inf"), cost=lambda c: float(c.t)) -> BatchPolicy:
    return BatchPolicy(max_cells=max_cells, max_cost=max_cost,
                       batchable=lambda c: c.pipeline == "sweep_test_batch", cost=cost)


def test_batch_key_is_the_cell_without_t_K_and_seed():
    a, b = _cells([0], t=(1,), K=(None,))[0], _cells([5], t=(9,), K=(None,))[0]
    assert a.batch_key() == b.batch_key() and a.cell_id != b.cell_id
    k1, k2 = _cells([0], K=(1, 2))
    assert k1.batch_key() == k2.batch_key()
    differs = [_cells([0], algorithm="other")[0], _cells([0], {"x": 1})[0],
               _cells([0], backend="jax")[0], _cells([0], study="other")[0],
               _cells([0], pipeline="sweep_test")[0]]
    assert all(other.batch_key() != a.batch_key() for other in differs)


def test_feed_batches_up_to_max_cells_within_one_batch_key():
    probe = _cells(range(5))
    other = _cells(range(3), algorithm="other")
    single = _cells(range(2), pipeline="sweep_test")  # no run_batch: one cell per task
    interleaved = [c for trio in zip(probe, other, single + [None]) for c in trio if c]
    feed = Feed(interleaved + probe[3:], lambda c: True, batching=_policy(max_cells=3))
    first = feed.take_batch(None)
    assert first.cells == tuple(probe[:3]) and first.attempts == (1, 1, 1)
    assert not first.isolate
    assert feed.take_batch(None).cells == tuple(other)  # the window's head, then its kin
    assert feed.take_batch(None).cells == (single[0],)
    assert feed.take_batch(None).cells == (single[1],)
    assert feed.take_batch(None).cells == tuple(probe[3:])
    assert feed.take_batch(None) is None and feed.empty()


def test_feed_caps_a_batch_by_its_total_cost_and_sends_a_costly_cell_alone():
    cells = _cells([0], t=(4, 3, 5, 1, 20, 2))  # cost = t with this policy
    feed = Feed(cells, lambda c: True, batching=_policy(max_cost=10))
    # 4 + 3 = 7; 5 would overrun, 1 still fits (8), 20 does not, 2 fits (10)
    assert [c.t for c in feed.take_batch(None).cells] == [4, 3, 1, 2]
    assert [c.t for c in feed.take_batch(None).cells] == [5]
    assert [c.t for c in feed.take_batch(None).cells] == [20]  # over max_cost: alone
    assert feed.take_batch(None) is None


def test_feed_max_cells_1_turns_batching_off_and_the_default_never_batches():
    for feed in (Feed(_cells(range(3)), lambda c: True, batching=_policy(max_cells=1)),
                 Feed(_cells(range(3)), lambda c: True)):
        assert [len(feed.take_batch(None).cells) for _ in range(3)] == [1, 1, 1]


def test_feed_re_sent_cells_go_alone_and_first():
    cells = _cells(range(6))
    feed = Feed(cells, lambda c: True, batching=_policy())
    feed.take_batch(None)  # every cell leaves in one batch ...
    feed.resend(cells[4], 1, isolate=False)  # ... and two come back after a crash
    feed.resend(cells[2], 2, isolate=True)
    assert feed.take_batch(None, idle=False) is None  # isolated: idle actors only
    assert feed.take_batch(None) == ((cells[2],), (2,), True)
    assert feed.take_batch(None, idle=False) == ((cells[4],), (1,), False)
    assert feed.take_batch(None) is None


def test_feed_prefers_the_actors_shape_key_then_batches_around_it():
    near = _cells(range(3), {"n": 1})
    far = [Cell(study="batching", pipeline="sweep_test_batch", problem="toy2",
                algorithm="probe", backend="none", t=1, K=None, seed=s) for s in range(3)]
    feed = Feed(near + far, lambda c: True, batching=_policy())
    assert feed.take_batch(far[0].shape_key()).cells == tuple(far)
    assert feed.take_batch(far[0].shape_key()).cells == tuple(near)


def test_the_registry_policy_reads_run_batch_and_cost_from_the_pipeline():
    policy = BatchPolicy.from_registry(8, 100.0)
    batch, plain = _cells([0], t=(3,), K=(7,))[0], _cells([0], t=(3,), K=(7,),
                                                           pipeline="sweep_test")[0]
    assert policy.max_cells == 8 and policy.max_cost == 100.0
    assert policy.batchable(batch) and not policy.batchable(plain)
    assert policy.cost(batch) == 3.0  # sweep_test_batch's own cost: t
    assert policy.cost(plain) == 10.0  # the default: t + K


# --- run_cells, without Ray --------------------------------------------------------------


def test_run_cells_gives_each_cell_one_row_whatever_run_batch_yields():
    params = dict(nan_seeds=[1], raise_seeds=[2], batch_skip_seeds=[3], batch_repeat=True,
                  batch_no_wall=True, sleep_s=0.01)
    cells = _cells(range(5), params)
    rows = list(run_cells(cells, [1, 1, 1, 1, 2]))
    # each once: the yielded ones first, then the one run_batch never yielded
    assert [row["seed"] for row, _ in rows] == [0, 1, 2, 4, 3]
    by_seed = {row["seed"]: row for row, _ in rows}
    assert [by_seed[s]["status"] for s in range(5)] == ["ok", "diverged", "error", "ok",
                                                        "ok"]
    assert "injected failure for seed 2" in by_seed[2]["error_message"]
    assert by_seed[4]["attempt"] == 2 and by_seed[0]["attempt"] == 1
    for seed in (0, 1, 2, 4):  # from run_batch: the batch's size; no wall time given,
        assert _extra(by_seed[seed])["batch_size"] == 5  # so a share of the batch's
        assert 0 < by_seed[seed]["wall_time_s"] < 1
    # Seed 3 was never yielded: it ran alone through run_cell, with its own wall time.
    assert "batch_size" not in _extra(by_seed[3]) and by_seed[3]["wall_time_s"] >= 0.01
    single, _ = run_cell(cells[0])
    assert single["status"] == "ok" and "batch_size" not in _extra(single)
    assert single["hypergrad_rel_error"] == by_seed[0]["hypergrad_rel_error"]


def test_run_cells_runs_the_rest_one_by_one_when_run_batch_raises():
    cells = _cells(range(4), dict(batch_raise_after=2, nan_seeds=[3]))
    rows = [row for row, _ in run_cells(cells)]
    assert [row["seed"] for row in rows] == [0, 1, 2, 3]
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "diverged"]
    assert [_extra(row).get("batch_size") for row in rows] == [4, 4, None, None]
    assert [_extra(row).get("batch_error") for row in rows] == [
        None, None, "RuntimeError: injected run_batch failure",
        "RuntimeError: injected run_batch failure"]
    with pytest.raises(ValueError, match="batch_key"):
        list(run_cells(_cells([0]) + _cells([1], algorithm="other")))


# --- the study section, at plan time ------------------------------------------------------


STUDY = """\
study: plan-batching
pipeline: hypergradient_error
backend: jax
problems: [ridge]
algorithms: [itd]
t: [5]
output: out
mlflow: {{enabled: false}}
{more}
"""


@pytest.mark.parametrize("more, fragment", [
    ("batching: {max_cells: 0}", "batching.max_cells: must be an integer >= 1, got 0"),
    ("batching: {max_cell: 8}", "batching: unknown key 'max_cell'. Valid keys: max_cells, "
                                "max_cost"),
    ("batching: {max_cost: -1}", "batching.max_cost: must be > 0, got -1"),
    ("batching: {max_cells: 1, max_cost: 50}", None),
])
def test_the_batching_section_is_checked_at_plan(tmp_path, more, fragment):
    (tmp_path / "study.yaml").write_text(STUDY.format(more=more))
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="", HYPERSWEEP_PLUGINS="")
    result = subprocess.run([sys.executable, "-m", "hypersweep", "plan", "study.yaml"],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    if fragment is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # nothing written


# --- on a real local Ray ------------------------------------------------------------------


def _study(output: Path, **overrides):
    values = dict(name="batching", num_actors=1, max_retries=1)
    values.update(overrides)
    return sweep_test_pipeline.study(output, **values)


def _rows(output: Path) -> dict[int, dict]:
    return {row["seed"]: row for row in parquet.read_results(output).to_pylist()}


def _raw_ids(output: Path) -> list[str]:
    """Every row's cell_id in the results folder, straight from pyarrow (no dedupe)."""
    return pq.read_table(output / "results").column("cell_id").to_pylist()


@pytest.mark.ray
def test_a_diverging_seed_diverges_alone_in_its_batch(ray_session, tmp_path):
    cells = _cells(range(6), dict(nan_seeds=[2]), backend="jax")
    study = _study(tmp_path / "out", backend=("jax",))  # compile-cache counts on
    summary = driver.run_cells(study, cells, quiet=True)
    rows = _rows(tmp_path / "out")
    assert [rows[s]["status"] for s in range(6)] == ["ok", "ok", "diverged"] + ["ok"] * 3
    assert "non-finite hypergrad_rel_error" in rows[2]["error_message"]
    for row in rows.values():
        extra = _extra(row)
        assert extra["batch_size"] == 6 and row["attempt"] == 1
        # the actor's compile-cache counts, since its previous row
        assert extra["compile_cache_lookups"] == extra["compile_cache_hits"] == 0
    assert summary["batches"] == 1 and summary["mean_batch_size"] == 6
    assert summary["counts"] == {"ok": 5, "error": 0, "diverged": 1, "timeout": 0,
                                 "crashed": 0}


@pytest.mark.ray
def test_a_crash_mid_batch_keeps_the_rows_sent_and_reruns_only_the_rest(ray_session,
                                                                       tmp_path):
    run_log = tmp_path / "runs.txt"
    # the pause lets each yielded row reach the driver before the next cell starts
    cells = _cells(range(6), dict(crash_seeds=[3], run_log=str(run_log), batch_pause_s=0.3))
    study = _study(tmp_path / "out")

    summary = driver.run_cells(study, cells, quiet=True)

    rows = _rows(tmp_path / "out")
    assert [rows[s]["status"] for s in range(6)] == ["ok"] * 3 + ["crashed", "ok", "ok"]
    assert sorted(_raw_ids(tmp_path / "out")) == sorted(c.cell_id for c in cells)
    assert [_extra(rows[s]).get("batch_size") for s in range(6)] == [6, 6, 6, None, None,
                                                                    None]
    # The batch died in seed 3: its three pending cells were re-sent alone, uncharged;
    # seed 3 then died alone, was charged and retried once (max_retries 1).
    assert rows[3]["attempt"] == 2 and "died" in rows[3]["error_message"]
    assert all(rows[s]["attempt"] == 1 for s in (0, 1, 2, 4, 5))
    runs = Counter(int(line) for line in run_log.read_text().split())
    assert runs == {0: 1, 1: 1, 2: 1, 3: 3, 4: 1, 5: 1}
    assert summary["retries"] == 1 and summary["cells_done"] == 6

    again = driver.run_cells(study, cells, quiet=True)
    assert again["cells_done"] == 0 and again["cells_skipped"] == 6


@pytest.mark.ray
def test_a_batch_stopped_for_memory_blames_no_cell_until_one_outgrows_it_alone(
        ray_session, tmp_path):
    run_log = tmp_path / "runs.txt"
    params = dict(hog_seeds=[2], hog_step_mb=50, hog_every_s=0.01, hog_max_mb=2000,
                  hang_s=30, run_log=str(run_log), batch_pause_s=0.3)
    cells = _cells(range(5), params)
    # backend () preloads nothing: a runner's idle RSS (~100 MB) stays well below 300 MB
    study = _study(tmp_path / "out", resources={"memory_mb": 300}, cell_timeout_s=60)

    summary = driver.run_cells(study, cells, quiet=True)

    rows = _rows(tmp_path / "out")
    assert [rows[s]["status"] for s in range(5)] == ["ok", "ok", "crashed", "ok", "ok"]
    assert rows[2]["error_message"].startswith("memory limit exceeded: RSS ")
    assert rows[2]["attempt"] == 1 and summary["retries"] == 0  # certain once alone
    assert [_extra(rows[s]).get("batch_size") for s in range(5)] == [5, 5, None, None, None]
    runs = Counter(int(line) for line in run_log.read_text().split())
    assert runs == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1}


@pytest.mark.ray
def test_a_hanging_cell_of_a_batch_times_out_alone(ray_session, tmp_path):
    cells = _cells(range(4), dict(hang_seeds=[1], hang_s=60))
    summary = driver.run_cells(_study(tmp_path / "out", cell_timeout_s=2.0), cells,
                               quiet=True)
    rows = _rows(tmp_path / "out")
    assert [rows[s]["status"] for s in range(4)] == ["ok", "timeout", "ok", "ok"]
    assert "cell_timeout_s=2" in rows[1]["error_message"]
    # Alone after the batch overran 3 × 2 s: the plain cell_timeout_s (see test_faults).
    assert 2.0 < rows[1]["wall_time_s"] < 3.0, rows[1]["wall_time_s"]
    assert all(row["attempt"] == 1 for row in rows.values())
    assert _extra(rows[0])["batch_size"] == 4
    assert summary["retries"] == 0 and summary["counts"]["timeout"] == 1


@pytest.mark.ray
def test_a_batch_may_take_cell_timeout_s_per_pending_cell(ray_session, tmp_path):
    """Three cells of 1 s yielded together after 3 s: over one cell_timeout_s (2 s), under
    three, so not a timeout."""
    cells = _cells(range(3), dict(sleep_s=1.0, batch_at_end=True))
    summary = driver.run_cells(_study(tmp_path / "out", cell_timeout_s=2.0), cells,
                               quiet=True)
    rows = _rows(tmp_path / "out")
    assert [rows[s]["status"] for s in range(3)] == ["ok", "ok", "ok"]
    assert all(_extra(row)["batch_size"] == 3 for row in rows.values())
    assert summary["batches"] == 1


@pytest.mark.ray
def test_a_raising_run_batch_still_gives_every_cell_its_own_status(ray_session, tmp_path):
    params = dict(batch_raise_after=2, nan_seeds=[3], raise_seeds=[4])
    cells = _cells(range(6), params)
    summary = driver.run_cells(_study(tmp_path / "out"), cells, quiet=True)
    rows = _rows(tmp_path / "out")
    assert [rows[s]["status"] for s in range(6)] == ["ok", "ok", "ok", "diverged", "error",
                                                     "ok"]
    assert [_extra(rows[s]).get("batch_size") for s in range(6)] == [6, 6] + [None] * 4
    assert all("batch_error" in _extra(rows[s]) for s in range(2, 6))
    assert sorted(_raw_ids(tmp_path / "out")) == sorted(c.cell_id for c in cells)
    assert summary["batches"] == 1 and summary["cells_done"] == 6


@pytest.mark.ray
def test_hundreds_of_cells_in_batches_each_recorded_once(ray_session, tmp_path):
    """More cells than several Parquet flushes (50 rows) and than the feed's window:
    streamed rows (one kind), rows yielded at the end of their batch (another), and
    cells of a pipeline without run_batch, one per task."""
    streamed = _cells(range(16), t=range(1, 21))  # 320 cells
    at_end = _cells(range(16), dict(batch_at_end=True), t=range(1, 21))  # 320
    plain = _cells(range(20), pipeline="sweep_test")  # 20
    cells = [c for pair in zip(streamed, at_end) for c in pair] + plain
    output = tmp_path / "out"

    summary = driver.run_cells(_study(output, num_actors=2), cells, quiet=True)

    ids = _raw_ids(output)
    assert len(ids) == len(set(ids)) == len(cells) == 660
    assert set(ids) == {c.cell_id for c in cells}
    assert len(list((output / "results").glob("part-*.parquet"))) > 1
    table = parquet.read_results(output)
    assert table.num_rows == 660 and set(table.column("status").to_pylist()) == {"ok"}
    rows = {row["cell_id"]: row for row in table.to_pylist()}
    for cell in cells:  # each row is its own cell's, however it travelled
        assert rows[cell.cell_id]["hypergrad_rel_error"] == \
            sweep_test_pipeline.expected_rel_error(cell.t, cell.K, cell.seed)
    sizes = Counter(_extra(rows[c.cell_id]).get("batch_size") for c in streamed + at_end)
    assert None not in sizes and max(sizes) == 64  # the default max_cells
    assert not any("batch_size" in _extra(rows[c.cell_id]) for c in plain)
    assert summary["cells_done"] == 660 and summary["batches"] < 660 / 10
    assert summary["batches"] >= 20 + 2 * 5  # plain cells alone; 320 cells need 5 × 64
    assert summary["mean_batch_size"] == pytest.approx(660 / summary["batches"])
