"""Extending hypersweep: a throw-away problem, estimator and pipeline, copied from the
templates in docs/templates/, are picked up by the generic tests, ``run_cell``,
``hypersweep plan`` and the regression suite with no edit anywhere else.

The copies and the plugin module that registers them go to a temporary directory; every
check runs in a subprocess with that directory on PYTHONPATH and the plugin named in
``$HYPERSWEEP_PLUGINS`` (as a user's own package would be), so this process's catalogs
never see the throw-away entries.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from hypersweep import algorithms, problems

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "docs" / "templates"
PROBLEM, ESTIMATOR = "template_problem", "template_estimator"
PIPELINE, PLUGIN = "template_pipeline", "template_plugin"
#: the generic test files that must pick up a new problem
GENERIC = ("tests/test_problems.py", "tests/test_hypergradients.py", "tests/test_parity.py")


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """The three templates, copied under the module names the plugin registers."""
    where = tmp_path_factory.mktemp("plugin")
    for template, module in (("problem.py", PROBLEM), ("estimator_jax.py", f"{ESTIMATOR}_jax"),
                             ("estimator_torch.py", f"{ESTIMATOR}_torch"),
                             ("pipeline.py", PIPELINE), ("plugin.py", PLUGIN)):
        shutil.copy(TEMPLATES / template, where / f"{module}.py")
    return where


def _env(plugin_dir: Path) -> dict:
    paths = [str(plugin_dir), str(ROOT)] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), HYPERSWEEP_PLUGINS=PLUGIN,
               OMP_NUM_THREADS="1", RAY_ADDRESS="")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(args, plugin_dir, cwd=ROOT, timeout=300):
    return subprocess.run(args, cwd=cwd, env=_env(plugin_dir), capture_output=True,
                          text=True, timeout=timeout)


def test_generic_tests_pick_up_a_new_problem_and_estimator(plugin_dir, tmp_path):
    report = tmp_path / "report.xml"
    result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={report}", *GENERIC, "-k", f"{PROBLEM} or {ESTIMATOR}"],
                  plugin_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = set()
    for case in ET.parse(report).getroot().iter("testcase"):
        if not any(child.tag in ("failure", "error", "skipped") for child in case):
            passed.add(f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}")
    # every test id that was selected names the new problem or estimator; each file ran
    assert passed and all(PROBLEM in name or ESTIMATOR in name for name in passed)
    for module in GENERIC:
        assert any(name.startswith(Path(module).stem + "::") for name in passed), module
    expected = {f"test_problems::test_exact_hypergradient_matches_finite_differences"
                f"[{PROBLEM}]",
                f"test_problems::test_inner_grad_and_hessian_match_torch_autograd[{PROBLEM}]",
                f"test_problems::test_jax_torch_numpy_evaluate_the_same_losses[{PROBLEM}]",
                f"test_hypergradients::test_tbptt_with_K_ge_t_is_itd[{PROBLEM}-jax]",
                f"test_hypergradients::test_cg_at_large_K_is_exact_solve[{PROBLEM}-torch]"}
    # every consistent estimator (stocbio aside: it needs "minibatch") reaches the oracle
    # on both backends, and every estimator with two backends matches across them
    for algo in algorithms.names("estimator"):
        spec = algorithms.spec(algo)
        if spec.consistent and not spec.requires:
            expected |= {f"test_hypergradients::test_matches_oracle_at_large_t"
                         f"[{algo}-{PROBLEM}-{backend}]" for backend in ("jax", "torch")}
        if len(set(spec.impls.values())) > 1 and not spec.requires:
            expected.add(f"test_parity::test_torch_matches_jax[{algo}-{PROBLEM}]")
    # the new estimator: torch ↔ JAX on every problem (the new one too), float32 ≈ float64,
    # and, biased by design, finite but not ∇F on ridge
    for problem in (*problems.names(), PROBLEM):
        expected.add(f"test_parity::test_torch_matches_jax[{ESTIMATOR}-{problem}]")
    expected |= {f"test_hypergradients::test_float32_works_in_float32_and_is_close_to_"
                 f"float64[{ESTIMATOR}-{problem}-{backend}]"
                 for problem in ("ridge", "logreg") for backend in ("jax", "torch")}
    expected |= {f"test_parity::test_torch_matches_exact_on_ridge[{ridge}-{ESTIMATOR}]"
                 for ridge in ("per_feature", "scalar")}
    expected.add(f"test_parity::test_float32_close_to_float64[{ESTIMATOR}]")
    assert expected <= passed, sorted(expected - passed)


def test_a_new_pipeline_runs_a_cell_on_the_new_problem(plugin_dir):
    code = textwrap.dedent(f"""
        import json
        from hypersweep.registry import load_plugins
        load_plugins()  # what every actor does before its first cell
        from hypersweep.orchestrator.cell import Cell, run_cell
        cell = Cell(study="ext", pipeline="{PIPELINE}", problem="{PROBLEM}",
                    algorithm="aid_cg", backend="torch", t=200, K=50, seed=0,
                    pipeline_params=json.dumps({{"shift": 0.1}}))
        row, traces = run_cell(cell)
        print(json.dumps(row, default=str))
    """)
    result = _run([sys.executable, "-c", code], plugin_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["status"] == "ok", row["error_message"]
    assert (row["pipeline"], row["problem"]) == (PIPELINE, PROBLEM)
    # q = 0.8 on the template instance: 200 steps and CG leave float64 rounding only
    assert row["hypergrad_norm"] > 0
    assert row["hypergrad_abs_error"] <= 1e-8 * row["hypergrad_norm"]
    assert row["n_inner_grad_evals"] == 200


def _study(**pipeline_params) -> str:
    return yaml.safe_dump(dict(
        study="ext", pipeline=PIPELINE, backend="torch", problems=[PROBLEM],
        algorithms=["itd", "aid_cg"], t=[10, 20], K=[5], seeds=2, output="out",
        pipeline_params=pipeline_params, mlflow={"tracking_uri": "sqlite:///mlflow.db"}))


def test_plan_validates_a_study_of_the_new_pipeline(plugin_dir, tmp_path):
    (tmp_path / "good.yaml").write_text(_study(shift=0.5))
    good = _run([sys.executable, "-m", "hypersweep", "plan", "good.yaml"], plugin_dir,
                cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-3000:]
    assert PIPELINE in good.stdout and PROBLEM in good.stdout
    (tmp_path / "bad.yaml").write_text(_study(shfit=0.5))
    bad = _run([sys.executable, "-m", "hypersweep", "plan", "bad.yaml"], plugin_dir,
               cwd=tmp_path)
    assert bad.returncode == 2
    assert (f"Unknown pipeline_params key 'shfit' for pipeline '{PIPELINE}' (did you mean "
            f"'shift'?). Valid choices: shift") in bad.stderr
    assert not (tmp_path / "out").exists()


def test_the_regression_suite_gains_the_new_problem(plugin_dir):
    code = textwrap.dedent(f"""
        import yaml
        from hypersweep.registry import load_plugins
        load_plugins()
        from hypersweep.tools.regression.suite import complete_from_catalogs
        with open("configs/regression.yaml") as f:
            raw, added = complete_from_catalogs(yaml.safe_load(f))
        entry = [p for p in raw["problems"] if isinstance(p, dict)
                 and p.get("name") == "{PROBLEM}"]
        print(added, entry)
        assert "{PROBLEM}" in added and entry == [{{"name": "{PROBLEM}",
                                                   "params": {{"dim": 5}}}}]
    """)
    result = _run([sys.executable, "-c", code], plugin_dir)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
