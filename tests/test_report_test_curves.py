"""The report's test-metric view (``test_vs_time.png``, the stocBiO paper's figures): a
gradient method's curve is its test metric at each evaluation; a black-box searcher's is
the test metric of its best trial so far by validation loss. Numbers fixed by hand."""
from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from hypersweep.io.schema import empty_row, empty_trace
from hypersweep.orchestrator.cell import Cell, make_cell_id
from hypersweep.tools.report import figures, statistics

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _row(pipeline, algorithm, seed):
    cell = Cell(study="tc", pipeline=pipeline, problem="logreg", algorithm=algorithm,
                backend="jax", t=10, K=None, seed=seed)
    row = empty_row()
    row.update(study="tc", cell_id=make_cell_id(cell), pipeline=pipeline, problem="logreg",
               algorithm=algorithm, backend="jax", dtype="float64", K=None, t=10, seed=seed,
               status="ok", attempt=1, problem_params="{}", algorithm_params="{}",
               pipeline_params="{}", started_at=NOW, finished_at=NOW, wall_time_s=1.0)
    return row


def _trace(row, step, wall, val, test_loss, test_acc):
    tr = empty_trace()
    tr.update(study="tc", cell_id=row["cell_id"], step=step, wall_time_s=wall,
              val_loss=val, test_loss=test_loss, test_accuracy=test_acc, n_oracle_calls=step)
    return tr


# soba, seeds 0-2: test loss 1/(k+1)·(1+s) at wall k (k = 1..4). random, one seed: trials
# with val 0.9, 0.5, 0.7, 0.4 and test 0.8, 0.45, 0.1, 0.35 at walls 1..4: the best-so-far
# trial is 1, 2, 2, 4, so its test loss reads 0.8, 0.45, 0.45, 0.35 (never trial 3's 0.1).
RANDOM = [(0.9, 0.8), (0.5, 0.45), (0.7, 0.1), (0.4, 0.35)]


@pytest.fixture(scope="module")
def frames():
    rows, traces = [], []
    for seed in range(3):
        row = _row("hpo", "soba", seed)
        rows.append(row)
        traces += [_trace(row, k, float(k), 1.0, (1 + seed) / (k + 1), 0.5 + 0.1 * k)
                   for k in range(1, 5)]
    row = _row("blackbox", "random", 0)
    rows.append(row)
    traces += [_trace(row, i, float(i + 1), v, t, 1 - t) for i, (v, t) in enumerate(RANDOM)]
    return pd.DataFrame(rows), pd.DataFrame(traces)


def _at(curve, method, x):
    """The curve at the first grid point at or after x (a step function holds there)."""
    sub = curve[(curve["method"] == method) & (curve["x"] >= x * (1 - 1e-9))]
    return float(sub.iloc[0]["median"])


def test_gradient_curves_are_the_median_over_seeds_at_each_time(frames):
    results, traces = frames
    curves = statistics.trace_curves(statistics.method_frame(results), traces)
    loss = statistics.test_curves(curves, "wall_time_s", "test_loss")
    # at wall 2 (k = 2): seeds give 1/3, 2/3, 1: median 2/3
    assert _at(loss, "soba", 2.0) == pytest.approx(2 / 3)
    assert _at(loss, "soba", 4.0) == pytest.approx(2 / 5)


def test_blackbox_curves_follow_the_best_trial_by_validation_loss(frames):
    results, traces = frames
    curves = statistics.trace_curves(statistics.method_frame(results), traces)
    loss = statistics.test_curves(curves, "wall_time_s", "test_loss")
    acc = statistics.test_curves(curves, "wall_time_s", "test_accuracy")
    assert [_at(loss, "random", w) for w in (1, 2, 3, 4)] == pytest.approx(
        [0.8, 0.45, 0.45, 0.35])
    assert _at(acc, "random", 3.0) == pytest.approx(0.55)


def test_the_figure_has_one_row_per_problem_and_both_metrics(frames):
    results, traces = frames
    fig = figures.plot_test_vs_time(results, traces)
    assert fig is not None
    axes = fig.get_axes()
    assert [a.get_ylabel() for a in axes] == ["test loss", "test accuracy"]
    assert {line.get_label() for line in axes[0].get_lines()} == {
        "soba (gradient)", "random (black-box)"}
    figures.close(fig)
    assert figures.plot_test_vs_time(results, traces.assign(test_loss=None)) is None


def test_the_same_algorithm_with_other_pipeline_params_is_another_method(frames):
    results, _ = frames
    other = results[results["algorithm"] == "soba"].copy()
    other["pipeline_params"] = '{"outer_lr":1.0}'
    other["cell_id"] = other["cell_id"] + "-b"
    methods = statistics.method_frame(pd.concat([results, other]))
    labels = set(methods.loc[methods["algorithm"] == "soba", "method"])
    assert labels == {'soba {}', 'soba {"outer_lr":1.0}'}
    assert set(statistics.method_frame(results)["method"]) == {"soba", "random"}
