"""Parameters and data files are checked when the study is loaded, before Ray starts.

Every bad study runs the real CLI, ``plan`` and ``run``, in its own process (two at a
time): exit status 2, one stderr line naming the key and the valid range or choices, under
5 s of CPU (about 0.4-1 s of wall time on a quiet machine), neither Ray nor torch nor jax
imported, and nothing written (no output directory, no MLflow database).
The in-process tests check that the run-time checkers say the same thing (one schema) and
that the schemas match the catalogs.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from hypersweep.algorithms.catalog import ALGORITHMS
from hypersweep.pipelines import blackbox, hpo
from hypersweep.pipelines.catalog import PIPELINES
from hypersweep.registry import load_object
from hypersweep.validation import ParamsError

ROOT = Path(__file__).resolve().parents[1]

# Runs cli.main, then reports which heavy modules the process imported and the CPU seconds
# it used from its start (interpreter start-up included).
WRAPPER = textwrap.dedent("""
    import resource, sys
    from hypersweep.cli import main
    rc = main(sys.argv[1:])
    heavy = sorted(m for m in ("ray", "torch", "jax", "mlflow") if m in sys.modules)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    sys.stdout.write("\\nIMPORTED=" + ",".join(heavy) + "\\n")
    sys.stdout.write(f"CPU={usage.ru_utime + usage.ru_stime:.3f}\\n")
    sys.exit(rc)
""")
#: the budget of one bad study, in CPU seconds of its process; wall time is also bounded,
#: loosely, because the machine running the tests may be shared
CPU_BUDGET_S = 5.0
WALL_LIMIT_S = 20.0

HPO = dict(study="plan-check", pipeline="hpo", backend="jax", problems=["ridge"],
           algorithms=["itd"], t=[5], seeds=1, output="out",
           mlflow={"tracking_uri": "sqlite:///mlflow.db"})
BLACKBOX = {**HPO, "pipeline": "blackbox", "algorithms": ["random"]}


def _study(base: dict = HPO, **changes) -> str:
    return yaml.safe_dump({**base, **changes}, sort_keys=False)


def _hpo_params(**pipeline_params) -> str:
    return _study(pipeline_params=pipeline_params)


# (case id, study text, files to write next to it, expected fragment of the stderr line)
BAD = [
    ("zero_outer_lr", _hpo_params(outer_lr=0), {},
     "pipeline_params.outer_lr must be a finite number > 0, got 0"),
    ("negative_outer_steps", _hpo_params(outer_steps=-3), {},
     "pipeline_params.outer_steps must be an integer >= 1"),
    ("wrong_type_outer_steps", _hpo_params(outer_steps="ten"), {},
     "pipeline_params.outer_steps must be an integer >= 1 (it bounds the λ updates, "
     "time_budget_s only stops them earlier), got 'ten'"),
    ("unknown_key", _hpo_params(outr_lr=0.1), {},
     "Unknown pipeline_params key 'outr_lr' for pipeline 'hpo' (did you mean 'outer_lr'?). "
     "Valid choices: outer_steps,"),
    ("unknown_optimizer", _hpo_params(optimizer="adamw"), {},
     "pipeline_params.optimizer must be one of adam, sgd, got 'adamw'"),
    ("budget_missing", _hpo_params(outer_steps=None, time_budget_s=None), {},
     "pipeline_params.outer_steps must be an integer >= 1 (it bounds"),
    ("zero_time_budget", _hpo_params(time_budget_s=0), {},
     "pipeline_params.time_budget_s must be a finite number > 0 or null, got 0"),
    ("two_bad_keys", _hpo_params(outer_lr=-1, eval_every=0), {},
     "pipeline_params.outer_lr must be a finite number > 0, got -1; "
     "pipeline_params.eval_every must be an integer >= 1, got 0"),
    ("warm_start_v_itd", _hpo_params(warm_start_v=True), {},
     "pipeline_params.warm_start_v is true, but algorithm 'itd' has no adjoint warm start. "
     "Valid choices: aid_cg, aid_fp"),
    ("blackbox_space", _study(BLACKBOX, pipeline_params={"space": {"low": 1, "high": 0}}), {},
     "pipeline_params.space needs low < high in every coordinate"),
    ("blackbox_space_problem", _study(BLACKBOX, pipeline_params={
        "space": {"ridgee": {"low": 0, "high": 1}}}), {},
     "pipeline_params.space.ridgee is not a problem. Valid choices: ridge,"),
    ("blackbox_tied_list", _study(BLACKBOX, pipeline_params={
        "space": {"low": [0, 1], "high": 2, "tied": True}}), {},
     "pipeline_params.space needs numbers for low and high when tied (one number for every "
     "coordinate), got low=[0, 1], high=2"),
    ("blackbox_tied_type", _study(BLACKBOX, pipeline_params={
        "space": {"low": 0, "high": 2, "tied": "yes"}}), {},
     "pipeline_params.space.tied must be true or false, got 'yes'"),
    ("hypergradient_error_lam", _study(pipeline="hypergradient_error",
                                       pipeline_params={"lam": "big"}), {},
     "pipeline_params.lam must be null (the problem's λ₀), a finite number"),
    # algorithm params
    ("stocbio_batch_size", _study(algorithms=[{"name": "stocbio", "params": {
        "batch_size": 0, "neumann_lr": -1.0}}], K=[5]), {},
     "algorithms[0].params.batch_size must be an integer >= 1, got 0; "
     "algorithms[0].params.neumann_lr must be a finite number > 0 or null, got -1.0"),
    ("hyperdistill_gamma", _study(algorithms=["itd", {"name": "hyperdistill", "params": {
        "gamma": 1.5}}], K=[5]), {},
     "algorithms[1].params.gamma must be a number in [0, 1], got 1.5"),
    ("asha_grace_period", _study(BLACKBOX, algorithms=[{"name": "asha", "params": {
        "grace_period": 50}}], t=[20, 100]), {},
     "algorithms[0].params.grace_period must be <= every t of the study"),
    # per-algorithm overrides
    ("override_outer_lr", _study(algorithms=["itd", {"name": "aid_cg", "pipeline_params": {
        "outer_lr": -1}}], K=[5]), {},
     "algorithms[1].pipeline_params.outer_lr must be a finite number > 0, got -1"),
    ("override_unknown_key", _study(algorithms=[{"name": "itd", "pipeline_params": {
        "evl_every": 5}}]), {},
     "Unknown algorithms[0].pipeline_params key 'evl_every' for pipeline 'hpo' (did you "
     "mean 'eval_every'?)"),
    ("override_K_without_K", _study(algorithms=[{"name": "itd", "K": [3]}]), {},
     "algorithms[0].K: algorithm 'itd' takes no K; remove its K"),
    ("override_t", _study(algorithms=[{"name": "itd", "t": [0]}]), {},
     "algorithms[0].t[0]: must be an integer >= 1"),
    ("override_warm_start_v", _study(algorithms=[{"name": "itd", "pipeline_params": {
        "warm_start_v": True}}]), {},
     "pipeline_params.warm_start_v is true, but algorithm 'itd' has no adjoint warm start"),
    # problem params with a fixed set of values (the modules' CHOICES)
    ("logreg_penalty", _study(problems=[{"name": "logreg", "params": {"penalty": "l1"}}]), {},
     "problems[0].params.penalty: 'l1' is not a penalty of problem 'logreg'. Valid "
     "choices: per_feature, shared"),
    ("data_cleaning_dataset", _study(problems=[{"name": "data_cleaning", "params": {
        "dataset": "mnist"}}]), {},
     "problems[0].params.dataset: 'mnist' is not a dataset of problem 'data_cleaning'. "
     "Valid choices: digits, mnist_shaped"),
    # data files
    ("data_missing", _study(problems=[{"name": "ridge", "params": {"data": "nope.npz"}}]), {},
     "problems[0].params.data: data file 'nope.npz' of problem 'ridge' does not exist"),
    ("data_corrupt", _study(problems=[{"name": "ridge", "params": {"data": "broken.npz"}}]),
     {"broken.npz": "truncated"},
     "problems[0].params.data: problem 'ridge' cannot use data file 'broken.npz': it is not "
     "an .npz archive"),
    ("data_corrupt_parquet", _study(problems=[{"name": "logreg", "params": {
        "data": "broken.parquet"}}]), {"broken.parquet": b"PAR1 but not really"},
     "problems[0].params.data: problem 'logreg' cannot use data file 'broken.parquet': "),
    ("data_missing_array", _study(problems=[{"name": "ridge", "params": {
        "data": "partial.npz"}}]), {"partial.npz": "partial"},
     "problems[0].params.data: problem 'ridge' cannot use data file 'partial.npz': missing "
     "array(s) y_val"),
]
COMMANDS = ("plan", "run")


def _npz(kind: str) -> bytes:
    """A small regression data set as .npz bytes: whole, without y_val, or cut in half."""
    g = np.random.default_rng(0)
    arrays = {"X_train": g.standard_normal((20, 3)), "y_train": g.standard_normal(20),
              "X_val": g.standard_normal((10, 3)), "y_val": g.standard_normal(10)}
    if kind == "partial":
        del arrays["y_val"]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    return data[:len(data) // 2] if kind == "truncated" else data


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="", HYPERSWEEP_PLUGINS="")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _prepare(workdir: Path, text: str, files: dict) -> list[str]:
    (workdir / "study.yaml").write_text(text)
    for name, content in files.items():
        (workdir / name).write_bytes(content if isinstance(content, bytes) else _npz(content))
    return sorted(p.name for p in workdir.iterdir())


def _cli(workdir: Path, argv: list[str]):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", WRAPPER, *argv], cwd=workdir, env=_env(),
                            capture_output=True, text=True, timeout=120)
    return result, time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(case, command) -> (result, seconds, files before, files after), two at a time."""
    jobs = {}
    for case, text, files, _ in BAD:
        for command in COMMANDS:
            workdir = tmp_path_factory.mktemp(f"{case}-{command}")
            jobs[case, command] = (workdir, _prepare(workdir, text, files))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(_cli, workdir, [key[1], "study.yaml"])
                   for key, (workdir, _) in jobs.items()}
        return {key: (*futures[key].result(), before,
                      sorted(p.name for p in workdir.iterdir()))
                for key, (workdir, before) in jobs.items()}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case, text, files, fragment", BAD, ids=[c[0] for c in BAD])
def test_bad_study_exits_2_before_ray(runs, case, text, files, fragment, command):
    result, seconds, before, after = runs[case, command]
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hypersweep: error: study.yaml: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "IMPORTED=\n" in result.stdout  # not ray (so no Ray process), torch, jax, mlflow
    assert after == before  # no output dir, no mlflow.db, no results/
    cpu = float(result.stdout.rsplit("CPU=", 1)[1])
    assert cpu < CPU_BUDGET_S and seconds < WALL_LIMIT_S, (cpu, seconds)


def test_a_good_data_file_plans(tmp_path):
    text = _study(problems=[{"name": "ridge", "params": {"data": "ok.npz"}}])
    before = _prepare(tmp_path, text, {"ok.npz": "whole"})
    result, _ = _cli(tmp_path, ["plan", "study.yaml"])
    assert result.returncode == 0, result.stderr
    assert "1 cells" in result.stdout and "IMPORTED=\n" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- one schema: the cells' checkers say what plan says --------------------------------


@pytest.mark.parametrize("params, pipeline", [
    ({"outer_lr": 0}, hpo), ({"outer_steps": -3}, hpo), ({"outer_steps": "ten"}, hpo),
    ({"outr_lr": 0.1}, hpo), ({"optimizer": "adamw"}, hpo),
    ({"outer_steps": None, "time_budget_s": None}, hpo),
    ({"num_samples": 0}, blackbox), ({"space": {"low": 1, "high": 0}}, blackbox),
])
def test_run_time_checkers_share_the_plan_time_schema(params, pipeline):
    from hypersweep.orchestrator.spec import StudyError, parse_study

    name = pipeline.__name__.rsplit(".", 1)[-1]
    with pytest.raises(ParamsError) as at_run:
        pipeline.check_params(params)
    assert isinstance(at_run.value, ValueError)
    base = HPO if name == "hpo" else BLACKBOX
    with pytest.raises(StudyError) as at_plan:
        parse_study(_study(base, pipeline_params=params))
    assert str(at_plan.value) == str(at_run.value)


def test_defaults_are_the_models():
    hpo_model = load_object(PIPELINES.spec("hpo").params_model)
    assert hpo.check_params({}) == hpo.DEFAULTS == hpo_model.defaults()
    assert blackbox.check_params({}) == blackbox.DEFAULTS
    assert hpo.DEFAULTS["outer_steps"] == 100 and blackbox.DEFAULTS["num_samples"] == 20


def test_every_production_pipeline_has_a_schema():
    with_model = {spec.name for spec in PIPELINES if spec.params_model}
    assert with_model == {"hypergradient_error", "hpo", "blackbox"} <= set(PIPELINES.names())
    for name in with_model:
        model = load_object(PIPELINES.spec(name).params_model)
        assert model.owner == f"pipeline {name!r}"
        model.parse({}, prefix="pipeline_params")  # every key has a default


def test_algorithm_models_match_the_catalog():
    with_params = {spec.name for spec in ALGORITHMS if spec.params}
    assert {spec.name for spec in ALGORITHMS if spec.params_model} == with_params
    for name in with_params:
        model = load_object(ALGORITHMS.spec(name).params_model)
        defaults = dict(ALGORITHMS.spec(name).params)
        assert model.owner == f"algorithm {name!r}"
        assert set(model.model_fields) == set(defaults), name
        model.parse(defaults, prefix="params")  # the catalog's defaults pass their model


def test_schemas_import_no_backend():
    code = ("import sys\nimport hypersweep.pipelines.params\n"
            "import hypersweep.algorithms.params\n"
            "import hypersweep.orchestrator.spec\n"
            "print(sorted(m for m in ('torch', 'jax', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_choice_param_of_the_catalog_is_checked_at_plan(tmp_path, monkeypatch):
    """Each param a problem module lists in CHOICES: a value outside it fails the study's
    validation naming the key and every valid value; each valid value passes it (and the
    registry's check, what ``problems.make`` runs)."""
    from hypersweep import problems
    from hypersweep.orchestrator.spec import StudyError, parse_study

    monkeypatch.chdir(tmp_path)  # the study's output is probed, relative to the cwd

    def study(name, key, value):
        return _study(problems=[{"name": name, "params": {key: value}}])

    checked = 0
    for name in problems.names():
        for key, valid in problems.param_choices(name).items():
            with pytest.raises(StudyError) as err:
                parse_study(study(name, key, "no-such-value"))
            text = str(err.value)
            assert f"problems[0].params.{key}" in text and "\n" not in text
            assert all(str(v) in text for v in valid), text
            with pytest.raises(ValueError, match=f"{key}.*Valid choices"):
                problems.check_params(name, {key: "no-such-value"})
            for value in valid:
                parse_study(study(name, key, value))
                problems.check_params(name, {key: value})
            checked += 1
    assert checked >= 5  # logreg's dataset and penalty, three other datasets
