"""The MLflow view of a study, read back through a real sqlite store and ``MlflowClient``:
the model-training experiment kind, full run names and descriptions, sizes and the K
setting as params, ``log10_`` companions of the error metrics, outer-step curves for
hpo / blackbox cells (idempotent), the cells' real start and end times, and a results
folder that keeps its artifacts when it moves.

No Ray: :class:`~hypersweep.io.tracking.MlflowLogger`, the driver's
:class:`~hypersweep.orchestrator.sinks.Sinks` and ``sync_mlflow`` are fed synthetic rows.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import shutil

import pytest

from hypersweep.io import parquet, tracking, tracking_sync
from hypersweep.io.schema import empty_row, empty_trace

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def _ms(seconds: float) -> int:
    return int((T0 + dt.timedelta(seconds=seconds)).timestamp() * 1000)


def _row(study: str, *, pipeline: str = "hypergradient_error", algorithm: str = "aid_cg",
         t: int = 5, K: int | None = 5, K_setting: str | None = "5", seed: int = 0,
         start_s: float = 0.0, wall: float = 1.0, **columns) -> dict:
    """A result row of a finished cell that started ``start_s`` after T0 and ran ``wall``."""
    row = empty_row()
    row.update(study=study, pipeline=pipeline, problem="ridge", algorithm=algorithm,
               backend="jax", dtype="float64", K=K, K_setting=K_setting, t=t, seed=seed,
               status="ok", attempt=1, problem_params='{"n_features":10}',
               algorithm_params="{}", pipeline_params="{}", wall_time_s=wall,
               started_at=T0 + dt.timedelta(seconds=start_s),
               finished_at=T0 + dt.timedelta(seconds=start_s + wall))
    row["cell_id"] = f"{study}.{algorithm}.t{t}.K{K_setting}.s{seed}"
    row.update(columns)
    return row


def _traces(row: dict, steps: int) -> list[dict]:
    """An hpo cell's trace: val loss falling and ‖∇F‖ = 10^-k at outer step k, 0.5 s each."""
    out = []
    for k in range(steps):
        trace = empty_trace()
        trace.update(study=row["study"], cell_id=row["cell_id"], step=k,
                     wall_time_s=0.5 * (k + 1), val_loss=1.0 / (k + 1),
                     outer_grad_norm=10.0 ** -k, n_oracle_calls=10 * (k + 1),
                     extra=json.dumps({"value": 2.0 / (k + 1), "nonfinite": False}))
        out.append(trace)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the logger tests (each uses its own experiment)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("view")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri)


def _logger(uri: str, name: str, pipeline: str = "hypergradient_error",
            **kwargs) -> tracking.MlflowLogger:
    logger = tracking.MlflowLogger(
        uri, name, name, study_params={"pipeline": pipeline, "output": name},
        artifact_root=tracking.default_artifact_root(uri), **kwargs)
    logger.connect()
    return logger


def _children(client, logger) -> list:
    return client.search_runs([logger.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{logger.parent_run_id}'")


def _history(client, run, key) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def test_experiments_open_in_the_model_training_view(store):
    uri, client = store
    new = _logger(uri, "kind-new")
    assert client.get_experiment(new.experiment_id).tags[
        "mlflow.experimentKind"] == "custom_model_development"
    # an existing experiment found by name (here one marked for the GenAI view) is switched
    old_id = client.create_experiment(
        "kind-old", artifact_location=tracking.default_artifact_root(uri),
        tags={"mlflow.experimentKind": "genai_development"})
    assert _logger(uri, "kind-old").experiment_id == old_id
    assert client.get_experiment(old_id).tags[
        "mlflow.experimentKind"] == "custom_model_development"


def test_runs_have_full_names_and_descriptions(store):
    uri, client = store
    logger = _logger(uri, "names")
    logger.log_rows([_row("names", t=t, K=t, K_setting="t", algorithm_params='{"tol":0.001}',
                          hypergrad_rel_error=1.0 / t) for t in (5, 40)]
                    + [_row("names", algorithm="itd", K=None, K_setting=None, seed=1,
                            dtype="float32", hypergrad_rel_error=0.5)])
    hpo = _logger(uri, "names-hpo", pipeline="hpo")
    row = _row("names-hpo", pipeline="hpo", t=50, K=10, K_setting="10", val_loss=0.3)
    hpo.log_rows([row], {row["cell_id"]: _traces(row, 3)})

    names = sorted(run.info.run_name for run in _children(client, logger))
    assert names == ["ridge aid_cg(tol=0.001) K=t jax s0", "ridge itd jax/float32 s1"]
    (hpo_child,) = _children(client, hpo)
    assert hpo_child.info.run_name == "ridge aid_cg K=10 t=50 jax s0"

    notes = {run.info.run_name: run.data.tags["mlflow.note.content"]
             for run in _children(client, logger)}
    note = notes["ridge aid_cg(tol=0.001) K=t jax s0"]
    assert "**Step**: t" in note and "K=t: each cell's K equals its t" in note
    assert "`hypergrad_rel_error`: ‖ĝ − ∇F(λ)‖ / ‖∇F(λ)‖" in note
    assert "`log10_<error>`" in note
    note = hpo_child.data.tags["mlflow.note.content"]
    assert "**Step**: the outer step k" in note and "`result.*`" in note
    assert "`outer_grad_norm`" in note and "`val_loss`" in note
    parent = client.get_run(logger.parent_run_id)
    assert parent.info.run_name == "names"
    assert "**Study `names`** — pipeline `hypergradient_error`" in parent.data.tags[
        "mlflow.note.content"]
    assert "its step is t" in parent.data.tags["mlflow.note.content"]
    assert "one nested run per cell" in client.get_run(hpo.parent_run_id).data.tags[
        "mlflow.note.content"]


def test_the_K_setting_and_problem_sizes_are_params(store):
    uri, client = store
    logger = _logger(uri, "params")
    # typed size columns (the instance as built) where the row has them, beside the JSON
    logger.log_rows([_row("params", t=t, K=t, K_setting="t", n_train=40, n_features=10)
                     for t in (5, 40)])
    (child,) = _children(client, logger)
    params = child.data.params
    assert params["K"] == "t" and params["problem.n_features"] == "10"
    assert params["n_train"] == "40" and params["n_features"] == "10"
    assert "n_val" not in params  # a null typed column is no param


def test_error_metrics_have_log10_companions(store):
    uri, client = store
    logger = _logger(uri, "log10")
    logger.log_rows([_row("log10", t=5, hypergrad_rel_error=1e-8, hypergrad_abs_error=0.0,
                          inner_suboptimality=2e-3, val_loss=0.5),
                     _row("log10", t=40, hypergrad_rel_error=1e-12, hypergrad_abs_error=1e-9,
                          inner_suboptimality=2e-7, val_loss=0.5)])
    (child,) = _children(client, logger)
    assert _history(client, child, "log10_hypergrad_rel_error") == {5: -8.0, 40: -12.0}
    assert _history(client, child, "log10_hypergrad_abs_error") == {40: -9.0}  # 0: none
    assert _history(client, child, "log10_inner_suboptimality") == pytest.approx(
        {5: math.log10(2e-3), 40: math.log10(2e-7)})
    assert _history(client, child, "hypergrad_rel_error") == {5: 1e-8, 40: 1e-12}
    assert "log10_val_loss" not in child.data.metrics  # not an error metric


def test_hpo_children_draw_curves_over_outer_steps_once(store):
    uri, client = store
    logger = _logger(uri, "curves", pipeline="hpo")
    rows = [_row("curves", pipeline="hpo", t=t, K=10, K_setting="10", start_s=10.0 * i,
                 wall=3.0, val_loss=0.25, outer_grad_norm=1e-6, outer_grad_norm_rel=1e-3)
            for i, t in enumerate((50, 100))]
    traces = {row["cell_id"]: _traces(row, 5) for row in rows}
    assert logger.log_rows(rows, traces) == 2

    children = {int(run.data.params["t"]): run for run in _children(client, logger)}
    assert sorted(children) == [50, 100]  # one run per cell: each t its own curve
    child = children[50]
    assert _history(client, child, "val_loss") == {k: 1.0 / (k + 1) for k in range(5)}
    assert _history(client, child, "log10_outer_grad_norm") == pytest.approx(
        {k: -float(k) for k in range(5)})
    assert _history(client, child, "extra.value") == {k: 2.0 / (k + 1) for k in range(5)}
    assert "extra.nonfinite" not in child.data.metrics  # a flag, not a number
    # the trace's wall time places each point in time, from the cell's start
    stamps = {m.step: m.timestamp for m in client.get_metric_history(child.info.run_id,
                                                                     "val_loss")}
    assert stamps == {k: _ms(0.5 * (k + 1)) for k in range(5)}
    # the result row beside the curve, at the last outer step, under its own names
    assert _history(client, child, "result.val_loss") == {4: 0.25}
    assert _history(client, child, "result.log10_outer_grad_norm_rel") == {4: -3.0}

    # idempotent: the same logger, a new one (a resumed driver, sync-mlflow), a retried
    # cell's older row in the same batch — nothing is logged twice
    assert logger.log_rows(rows, traces) == 0
    again = _logger(uri, "curves", pipeline="hpo")
    older = dict(rows[0], finished_at=rows[0]["finished_at"] - dt.timedelta(seconds=1),
                 status="crashed")
    assert again.log_rows([older, *rows], traces) == 0 and again.runs_created == 0
    assert len(client.get_metric_history(child.info.run_id, "val_loss")) == 5
    assert len(_children(client, logger)) == 2


def test_runs_span_the_real_times_of_their_cells(store):
    uri, client = store
    logger = _logger(uri, "times", parent_start_ms=_ms(-5.0))
    first = _row("times", t=5, K=5, start_s=2.0, wall=4.0, hypergrad_rel_error=0.1)
    later = _row("times", t=40, K=5, start_s=20.0, wall=7.5, hypergrad_rel_error=0.01)
    logger.log_rows([first])
    logger.log_rows([later])  # a later batch of the same group moves its end
    logger.finish("FINISHED", end_time=_ms(30.0))
    (child,) = _children(client, logger)
    assert (child.info.start_time, child.info.end_time) == (_ms(2.0), _ms(27.5))
    assert child.info.status == "FINISHED"
    parent = client.get_run(logger.parent_run_id).info
    assert (parent.start_time, parent.end_time) == (_ms(-5.0), _ms(30.0))


def test_sinks_send_trace_curves_and_a_relative_output(tmp_path):
    """The driver's path: Sinks -> Parquet -> the writer thread -> MLflow."""
    from mlflow import MlflowClient

    import sweep_test_pipeline
    from hypersweep.orchestrator.sinks import Sinks

    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    study = sweep_test_pipeline.study(
        tmp_path / "results" / "sinks", name="sinks-view",
        mlflow={"enabled": True, "tracking_uri": uri, "experiment": "sinks-view"})
    sinks = Sinks(study, tmp_path / "results" / "sinks", flush_rows=100, flush_seconds=1e9)
    row = _row("sinks-view", pipeline="hpo", t=50, K=10, K_setting="10", val_loss=0.2)
    sinks.add(row, _traces(row, 4))
    sinks.flush()
    sinks.close(status="FINISHED", summary={"done": 1}, timeout=60)
    assert sinks.writer.error is None, sinks.writer.error

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sinks-view")
    (parent,) = client.search_runs([experiment.experiment_id],
                                   "tags.`hypersweep.role` = 'parent'")
    assert parent.data.params["output"] == "sinks"  # beside the store: moves with it
    (child,) = client.search_runs([experiment.experiment_id],
                                  "tags.`hypersweep.role` = 'group'")
    assert _history(client, child, "val_loss") == {k: 1.0 / (k + 1) for k in range(4)}
    assert _history(client, child, "result.val_loss") == {3: 0.2}


def test_a_moved_results_folder_keeps_its_artifacts(tmp_path):
    """Store + artifacts + Parquet in a/, ``mv a b``: sync-mlflow on b re-points the store
    at b/mlartifacts, so study.yaml downloads from the moved db (and new artifacts land in
    b); without it MLflow would look in a/, which is gone."""
    from mlflow import MlflowClient

    a, b = tmp_path / "a", tmp_path / "b"
    uri_a, uri_b = f"sqlite:///{a / 'mlflow.db'}", f"sqlite:///{b / 'mlflow.db'}"
    output = a / "moved"
    text = f"study: moved\npipeline: hpo\nmlflow: {{tracking_uri: '{uri_a}'}}\n"
    output.mkdir(parents=True)
    (output / parquet.STUDY_FILE).write_text(text)
    sink = parquet.ParquetSink(output)
    row = _row("moved", pipeline="hpo", t=50, K=10, K_setting="10", val_loss=0.2)
    sink.add(row, _traces(row, 3))
    sink.flush()
    first = tracking_sync.sync_mlflow(output)
    assert first["logged"] == 1 and first["relocated"] == 0
    parent_id = first["parent_run_id"]
    client_a = MlflowClient(tracking_uri=uri_a)
    assert client_a.get_run(parent_id).data.params["output"] == "moved"
    parent = client_a.get_run(parent_id).info  # a sync-made parent spans its cells
    assert (parent.start_time, parent.end_time) == (_ms(0.0), _ms(1.0))
    (child,) = client_a.search_runs([client_a.get_experiment_by_name("moved").experiment_id],
                                    "tags.`hypersweep.role` = 'group'")
    assert _history(client_a, child, "val_loss") == {0: 1.0, 1: 0.5, 2: 1.0 / 3}

    shutil.move(a, b)
    second = tracking_sync.sync_mlflow(b / "moved", tracking_uri=uri_b)
    assert second["logged"] == 0 and second["relocated"] == 1

    client_b = MlflowClient(tracking_uri=uri_b)
    run = client_b.get_run(parent_id)
    assert run.info.artifact_uri.startswith((b / "mlartifacts").as_uri() + "/")
    local = client_b.download_artifacts(parent_id, parquet.STUDY_FILE, str(tmp_path / "dl"))
    assert open(local, encoding="utf-8").read() == text
    client_b.log_text(parent_id, "later", "later.txt")  # new artifacts go to b as well
    assert (b / "mlartifacts" / parent_id / "artifacts" / "later.txt").is_file()
    assert not a.exists()
    assert tracking.relocate_artifacts(uri_b) == 0  # nothing left to re-point
