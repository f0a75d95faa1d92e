"""``run``/``plan --set KEY=VALUE``: study keys overridden before validation (dotted paths,
list indices, YAML values), validated like the file, kept in the study text that the
output's study.yaml and MLflow store; malformed overrides are one line, exit 2."""
from __future__ import annotations

import pytest

from hypersweep import cli
from hypersweep.orchestrator.expand import expand
from hypersweep.orchestrator.spec import StudyError, parse_study

STUDY = """\
study: set-check
pipeline: hpo
backend: jax
problems:
  - name: ridge
    params: {n_features: 4}
algorithms: [aid_cg, itd]
t: [10]
K: [3]
seeds: 1
pipeline_params: {outer_steps: 4}
output: out
mlflow: {enabled: false}
"""


def test_overrides_change_the_cells_and_stay_in_the_study_text():
    plain = parse_study(STUDY)
    study = parse_study(STUDY, overrides=[
        "pipeline_params.outer_lr=0.5", "seeds=3", "algorithms.1.t=[2, 5]",
        "problems.0.params.n_features=6", "mlflow={enabled: false}"])
    assert study.pipeline_params == {"outer_steps": 4, "outer_lr": 0.5}
    assert study.seeds == (0, 1, 2) and study.algorithms[1].t == (2, 5)
    assert study.problems[0].params == {"n_features": 6}
    cells = list(expand(study))
    assert len(cells) == 3 * (1 + 2) and len(list(expand(plain))) == 2
    # the stored text is the study with its overrides: re-read, the same plan
    assert study.source_text.startswith("# with --set pipeline_params.outer_lr=0.5")
    again = parse_study(study.source_text)
    assert [c.cell_id for c in expand(again)] == [c.cell_id for c in cells]


@pytest.mark.parametrize("override, message", [
    ("pipeline_params.outer_lr=-1", "pipeline_params.outer_lr must be a finite number > 0"),
    ("algorithms.7.t=3", "--set algorithms.7.t: 'algorithms.7' needs an index below 2"),
    ("nokey", "--set 'nokey': expected KEY=VALUE"),
    ("study.x=1", "--set study.x: 'study' holds 'set-check', not a mapping or a list"),
    ("seeds=[1, ", "--set seeds: the value '[1, ' is not valid YAML"),
    ("backend=tpu", "backend: unknown backend 'tpu'"),
])
def test_bad_overrides_are_one_line_and_exit_2(tmp_path, capsys, override, message):
    with pytest.raises(StudyError, match=None) as info:
        parse_study(STUDY, overrides=[override])
    assert message in str(info.value)
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    assert cli.main(["plan", str(path), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_plan_prints_the_overridden_cells(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    assert cli.main(["plan", str(path), "--set", "seeds=2", "--set", "t=[10, 20]"]) == 0
    assert "8 cells" in capsys.readouterr().out
