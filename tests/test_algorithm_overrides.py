"""Per-algorithm overrides of the study-wide settings: ``pipeline_params`` (merged key by
key), ``t`` and ``K`` on an algorithm entry apply to that entry's cells only; the same
algorithm may be listed twice with different overrides. Bad overrides: the one-line
exit-2 errors of ``tests/test_plan_validation.py`` (``override_*``)."""
from __future__ import annotations

import json

import pytest

from hypersweep.orchestrator.expand import count_cells, expand, pair_counts
from hypersweep.orchestrator.spec import StudyError, parse_study

STUDY = """\
study: overrides
pipeline: hpo
backend: jax
problems:
  - name: ridge
    params: {{n_features: 4, n_train: 20, n_val: 10}}
algorithms:
  - aid_cg
  - {{name: itd, t: [3, 6], pipeline_params: {{outer_lr: 0.5, eval_every: 2}}}}
  - {{name: aid_cg, K: [2], pipeline_params: {{optimizer: sgd}}}}
  - {{name: soba, pipeline_params: {{eval_every: 25, outer_steps: 50}}}}
t: [5]
K: [4]
seeds: [0, 1]
pipeline_params: {{outer_steps: 5, outer_lr: 0.1}}
resources: {{num_cpus: 1}}
output: {output}
mlflow: {{enabled: false}}
"""


def _cells(tmp_path):
    study = parse_study(STUDY.format(output=tmp_path / "out"))
    return study, list(expand(study))


def test_each_entry_gets_its_own_grid_and_merged_pipeline_params(tmp_path):
    study, cells = _cells(tmp_path)
    assert len(cells) == count_cells(study) == 2 * (1 + 2 + 1 + 1)
    assert [p.cells for p in pair_counts(study)] == [2, 4, 2, 2]
    by = {}
    for c in cells:
        by.setdefault((c.algorithm, c.pipeline_params), set()).add((c.t, c.K))
    plain = json.dumps({"outer_lr": 0.1, "outer_steps": 5}, separators=(",", ":"))
    assert by[("aid_cg", plain)] == {(5, 4)}
    assert by[("itd", '{"eval_every":2,"outer_lr":0.5,"outer_steps":5}')] == {(3, None),
                                                                             (6, None)}
    assert by[("aid_cg", '{"optimizer":"sgd","outer_lr":0.1,"outer_steps":5}')] == {(5, 2)}
    assert by[("soba", '{"eval_every":25,"outer_lr":0.1,"outer_steps":50}')] == {(5, None)}
    # the two aid_cg entries are different cells, with different ids
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == len(ids)
    labels = [p.algorithm for p in pair_counts(study)]
    assert labels[0] == "aid_cg" and labels[2].startswith("aid_cg ") and "sgd" in labels[2]


def test_the_same_entry_twice_is_still_refused(tmp_path):
    text = STUDY.format(output=tmp_path / "out").replace(
        "  - aid_cg\n", "  - {name: soba, pipeline_params: {eval_every: 25, outer_steps: 50}}\n")
    with pytest.raises(StudyError, match=r"algorithms\[3\]: repeats algorithms\[0\]"):
        parse_study(text)


@pytest.mark.ray
def test_a_run_honours_each_entrys_overrides(ray_session, tmp_path):
    from hypersweep.io.parquet import read_results, read_traces
    from hypersweep.orchestrator import driver

    study, cells = _cells(tmp_path)
    summary = driver.run_study(study, quiet=True)
    assert summary["study_counts"]["ok"] == len(cells) == 10
    results = read_results(study.output).to_pandas()
    traces = read_traces(study.output).to_pandas()
    steps = {cid: sorted(g.step) for cid, g in traces.groupby("cell_id")}
    for row in results.itertuples():
        params = json.loads(row.pipeline_params)
        every, last = params.get("eval_every", 1), params["outer_steps"]
        if row.algorithm == "soba":  # a solver: one chunk of eval_every per evaluation
            want = list(range(0, last + 1, every))
        else:  # an estimator: step k evaluated every eval_every steps and the last
            want = sorted({*range(0, last, every), last - 1})
        assert steps[row.cell_id] == want, (row.cell_id, steps[row.cell_id])
