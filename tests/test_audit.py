"""``hypersweep audit`` on real outputs, in real processes.

A small hypergradient_error study (ridge and quadratic × itd and aid_cg × both backends ×
2 seeds) runs through the real ``hypersweep run`` on the session's local Ray; the audit
re-runs its cells in a fresh process and must reproduce the actors' rows bitwise. Then the
audit must catch a stored metric edited by 1e-3 (relative), and the bug it exists for:
oracles cached by ``id(problem)`` in a process whose bounded problem cache frees (and
reuses) instances. Bad input is one stderr line and exit 2.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hypersweep import cli, problems
from hypersweep.io import parquet
from hypersweep.orchestrator.cell import Cell, canonical_json, run_cell
from hypersweep.tools.audit import main as audit
from hypersweep.tools.audit import worker
from hypersweep.problems.catalog import PROBLEMS

STUDY = """\
study: audit-test
pipeline: hypergradient_error
backend: [jax, torch]
dtype: float64
problems:
  - name: ridge
    params: {{n_features: 5, n_train: 20, n_val: 10}}
  - name: quadratic
    params: {{dim_inner: 6, dim_outer: 3}}
algorithms: [itd, aid_cg]
t: [10]
K: [t]
seeds: 2
resources: {{num_cpus: 1}}
cell_timeout_s: 120
output: {output}
mlflow: {{enabled: false}}
"""
N_CELLS = 16  # 2 problems × 2 algorithms × 2 backends × 2 seeds


def _audit(output, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypersweep", "audit", str(output), *args],
                          check=False, capture_output=True, text=True, timeout=300)


def _mismatches(stdout: str) -> list[list[str]]:
    """The rows of the markdown table: [cell_id, check, stored, fresh, difference]."""
    rows = [line.strip("| ").split(" | ") for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| cell_id |")]
    assert all(len(row) == 5 for row in rows), rows
    return rows


def _summary(stdout: str) -> str:
    return stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def study_output(ray_session, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    path = root / "study.yaml"
    path.write_text(STUDY.format(output=root / "out"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cli.main(["run", str(path)])
    assert rc == 0, printed.getvalue()
    assert printed.getvalue().strip().splitlines()[-1] == (
        f"verify a sample of the stored results: hypersweep audit {root / 'out'}")
    table = parquet.read_results(root / "out")
    assert table.num_rows == N_CELLS and set(table.column("status").to_pylist()) == {"ok"}
    return root / "out"


@pytest.mark.ray
def test_audit_of_a_fresh_study_passes_bitwise(study_output):
    result = _audit(study_output)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compared bitwise for rows stored by this host" in result.stdout
    assert f"{N_CELLS} of {N_CELLS} ok cells over 8 (problem, algorithm, backend) strata" \
        in result.stdout
    # 4 distinct instances (2 problems × 2 seeds): finite differences once per instance
    assert f"{N_CELLS} with a fresh oracle, 4 with finite differences" in result.stdout
    assert not _mismatches(result.stdout)
    summary = _summary(result.stdout)
    assert summary.startswith(f"audit: {N_CELLS} cells audited, ") and \
        summary.endswith(" checks passed, 0 failed"), summary
    # every cell: ≥ 7 metrics + counts + identity + status + 2 oracle checks
    assert int(summary.split(", ")[1].split()[0]) >= N_CELLS * 12


@pytest.mark.ray
def test_a_stored_error_off_by_1e_3_fails_and_names_the_cell(study_output, tmp_path):
    edited = tmp_path / "out"
    shutil.copytree(study_output, edited)
    results = edited / parquet.RESULTS_DIR
    table = pq.read_table(results)
    # --sample 4: one cell from each of 4 strata (seed 0); the victim is one of them
    picked = audit.sample_cells(parquet.read_results(edited).to_pylist(), 4, seed=0)
    victim = picked[-1]["cell_id"]
    is_victim = pc.equal(table.column("cell_id"), victim)
    rel = table.column("hypergrad_rel_error")
    column = table.schema.get_field_index("hypergrad_rel_error")
    table = table.set_column(column, "hypergrad_rel_error",
                             pc.if_else(is_victim, pc.multiply(rel, 1 + 1e-3), rel))
    for part in results.glob("*.parquet"):
        part.unlink()
    parquet.write_table_atomic(table, results)

    result = _audit(edited, "--sample", "4", "--fd-sample", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = _mismatches(result.stdout)
    assert [(r[0], r[1]) for r in rows] == [(victim, "reproduce: hypergrad_rel_error")]
    stored, fresh = float(rows[0][2]), float(rows[0][3])
    assert stored == pytest.approx(fresh * (1 + 1e-3), rel=1e-12)
    assert _summary(result.stdout).endswith(" checks passed, 1 failed (in 1 cell)")


def _recycling_lru(build, maxsize: int):
    """``functools.lru_cache(maxsize)`` whose evicted instance's object is reused for the
    next one built — what CPython does with the freed memory, but every time: measured
    over 8 seeds, pymalloc never gave a freed ``Problem``'s slot to the next ``Problem``
    (the objects allocated while building it took it first), so the test does it itself.
    """
    cache: OrderedDict = OrderedDict()

    @functools.wraps(build)
    def cached(*key):
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        instance = build(*key)
        if len(cache) >= maxsize:
            _, freed = cache.popitem(last=False)
            freed.__dict__.clear()
            freed.__dict__.update(instance.__dict__)  # same id(), the new instance's data
            instance = freed
        cache[key] = instance
        return instance

    return cached


def test_oracles_cached_by_id_are_caught(tmp_path, monkeypatch):
    from hypersweep.pipelines import common, hypergradient_error

    by_id: dict = {}

    def id_keyed_oracle(problem, lam):  # the bug this audit exists for
        key = (id(problem), np.asarray(lam, dtype=np.float64).tobytes())
        if key not in by_id:
            by_id[key] = (problem.exact_hypergradient(lam), problem.exact_inner_solution(lam))
        return by_id[key]

    monkeypatch.setattr(common, "oracle", id_keyed_oracle)
    monkeypatch.setattr(hypergradient_error, "oracle", id_keyed_oracle)  # imported by name
    monkeypatch.setattr(common, "_problem", _recycling_lru(common._problem.__wrapped__, 2))

    params = {"n_features": 5, "n_train": 20, "n_val": 10}
    sink = parquet.ParquetSink(tmp_path / "out")
    for seed in range(6):  # 6 instances through a cache of 2, one process, in turn
        cell = Cell(study="audit-stale", pipeline="hypergradient_error", problem="ridge",
                    algorithm="itd", backend="torch", t=5, K=None, seed=seed,
                    problem_params=canonical_json(params))
        row, traces = run_cell(cell)
        assert row["status"] == "ok", row["error_message"]
        sink.add(row, traces)
    sink.flush()

    stale = set()
    for row in parquet.read_results(tmp_path / "out").to_pylist():
        fresh = problems.make("ridge", backend="torch", seed=row["seed"], dtype="float64",
                              **params)
        g_star = fresh.exact_hypergradient(fresh.initial_hyperparams())
        if json.loads(row["extra"])["exact_hypergrad_norm"] != np.linalg.norm(g_star):
            stale.add(row["cell_id"])
    assert len(stale) >= 1  # the scenario really stored errors against another ∇F

    result = _audit(tmp_path / "out", "--fd-sample", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = _mismatches(result.stdout)
    assert {r[0] for r in rows} == stale
    assert {r[0] for r in rows if r[1] == "oracle: exact_hypergrad_norm"} == stale
    assert {r[0] for r in rows if r[1] == "oracle: hypergrad_abs_error"} == stale


def test_bad_input_exits_2_with_one_line(study_output, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "empty")], "is not a study output"),
             ([str(tmp_path / "missing")], "not found"),
             ([str(study_output), "--sample", "0"], "--sample must be an integer >= 1"),
             ([str(study_output), "--fd-sample", "-1"], "--fd-sample must be an integer"),
             ([str(study_output), "--sample", "x"], "invalid int value")]
    procs = [subprocess.Popen([sys.executable, "-m", "hypersweep", "audit", *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, _ in cases]
    for proc, (argv, fragment) in zip(procs, cases):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (argv, out, err)
        assert out == "" and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("hypersweep audit: error: ") and fragment in err, (argv, err)


def test_sample_is_stratified_round_robin_and_seeded():
    rows = [{"cell_id": f"{p}.{a}.{b}.{s}", "problem": p, "algorithm": a, "backend": b}
            for p in ("ridge", "logreg") for a in ("itd", "aid_cg", "stocbio")
            for b in ("jax", "torch") for s in range(5)]
    picked = audit.sample_cells(rows, 12, seed=0)
    strata = [(r["problem"], r["algorithm"], r["backend"]) for r in picked]
    assert len(set(strata)) == 12  # 12 strata: one cell each before any gets a second
    assert audit.sample_cells(list(reversed(rows)), 12, seed=0) == picked  # order-free
    assert audit.sample_cells(rows, 12, seed=1) != picked
    more = audit.sample_cells(rows, 30, seed=0)
    assert more[:12] == picked and len({r["cell_id"] for r in more}) == 30
    assert len(audit.sample_cells(rows, 1000, seed=0)) == len(rows)


#: data_cleaning at its default size (300 digits) takes ~1 s per F(λ) on a loaded 2-core box;
#: docs/audit.md has the default-size measurement for every problem
SMALL = {"data_cleaning": {"n_train": 100, "n_val": 100, "n_test": 100}}


@pytest.mark.parametrize("name", [spec.name for spec in PROBLEMS])
def test_finite_difference_tolerance_holds_with_margin_on_every_problem(name):
    problem = problems.make(name, backend="torch", seed=0, dtype="float64",
                            **SMALL.get(name, {}))
    lam = problem.initial_hyperparams()
    g_star = problem.exact_hypergradient(lam)
    check = worker.finite_difference(problem, lam, g_star, seed=7)
    gap = abs(check["finite_difference"] - check["directional"])
    assert gap <= check["fd_tolerance"] / 100, (gap, check)  # measured ≥ 1000× margin
    # The oracle of another instance (the id() bug's symptom) is far outside it.
    other = problems.make(name, backend="torch", seed=1, dtype="float64",
                          **SMALL.get(name, {}))
    wrong = float(np.sum(other.exact_hypergradient(lam) * worker.direction(lam.shape, 7)))
    assert abs(check["finite_difference"] - wrong) > check["fd_tolerance"]
