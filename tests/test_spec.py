"""Study spec: parsing, validation messages, and the expansion into cells.

All in-process and backend-free: nothing here imports torch, jax or Ray. The command-line
view of the same errors (exit status, one stderr line, nothing on disk) is in
tests/test_cli_offline.py.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import pydantic
import pytest
import yaml

from hypersweep import algorithms
from hypersweep.orchestrator.expand import (count_cells, expand, pair_counts, plan,
                                            skipped_combinations)
from hypersweep.orchestrator.spec import StudyError, load_study, parse_study

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "example_small.yaml"

BASE = dict(study="unit", pipeline="hypergradient_error", backend="jax",
            problems=["ridge"], algorithms=["itd", "aid_cg"], t=[10, 20], K=[10, "t"],
            seeds=[0, 1])


def study_text(**changes) -> str:
    data = {**BASE, **changes}
    return yaml.safe_dump({k: v for k, v in data.items() if v is not ...}, sort_keys=False)


def study(**changes):
    return parse_study(study_text(**changes))


def cells(**changes):
    return list(expand(study(**changes)))


# --- the example study -----------------------------------------------------------------


def test_example_study_parses_and_expands():
    spec = load_study(EXAMPLE)
    assert spec.study == "example-small"
    assert spec.backend == ("jax", "torch")
    assert [p.name for p in spec.problems] == ["ridge", "quadratic"]
    assert [a.name for a in spec.algorithms] == ["itd", "aid_fp", "aid_cg"]
    assert spec.t == (5, 20, 80) and spec.K == (5, "t") and spec.seeds == (0, 1)
    assert spec.dtype == "float64"
    assert spec.output == str(Path("results/example_small").absolute())
    assert spec.mlflow.experiment == "example-small"  # defaults to the study name
    assert spec.source_text == EXAMPLE.read_text()
    # per backend and seed: itd one cell per t (3); aid one cell per (t, K line): 3 t × 2
    # lines = 6 (at t = 5 the lines K = 5 and K = t each get a cell).
    # (3 + 6 + 6) * 2 backends * 2 seeds * 2 problems = 120.
    listed = list(expand(spec))
    assert len(listed) == count_cells(spec) == 120
    assert len({c.cell_id for c in listed}) == 120
    assert all(c.dtype == "float64" and c.study == "example-small" for c in listed)


def test_spec_is_frozen():
    spec = study()
    with pytest.raises(pydantic.ValidationError):
        spec.t = (1,)


# --- expansion -------------------------------------------------------------------------


def test_k_equal_to_t_gets_a_cell_on_each_line():
    got = [(c.algorithm, c.t, c.K, c.K_setting) for c in cells(seeds=[0])]
    # K = 10 and K = t coincide at t = 10: the same numbers, but one cell per line, so
    # each line (K_setting "10" and "t") is whole in Parquet and MLflow.
    assert got == [("itd", 10, None, None), ("itd", 20, None, None),
                   ("aid_cg", 10, 10, "10"), ("aid_cg", 10, 10, "t"),
                   ("aid_cg", 20, 10, "10"), ("aid_cg", 20, 20, "t")]


def test_algorithm_without_K_gets_one_cell_per_t():
    assert not algorithms.spec("itd").uses_K
    got = cells(algorithms=["itd"], t=[1, 5, 9], K=[0, 3, "t"], seeds=[0])
    assert [(c.t, c.K) for c in got] == [(1, None), (5, None), (9, None)]
    # and a study of K-free algorithms needs no K at all
    assert len(cells(algorithms=["itd"], K=...)) == 4


def test_K_missing_for_an_algorithm_that_uses_it():
    with pytest.raises(StudyError, match=r"^K: required: algorithm 'aid_cg' uses K"):
        study(K=...)


def test_expansion_order_and_params():
    spec = study(problems=["ridge", {"name": "logreg", "params": {"n_features": 5}}],
                 algorithms=["aid_fp", {"name": "stocbio", "params": {"batch_size": 8}}],
                 backend=["torch", "jax"], t=[3, 4], K=[1, 2], seeds=2,
                 pipeline_params={"lam": -1.0})
    got = [(c.problem, c.algorithm, c.backend, c.t, c.K, c.seed) for c in expand(spec)]
    expected = list(itertools.product(["ridge", "logreg"], ["aid_fp", "stocbio"],
                                      ["torch", "jax"], [3, 4], [1, 2], [0, 1]))
    assert got == expected
    first_logreg_stocbio = next(c for c in expand(spec)
                                if c.problem == "logreg" and c.algorithm == "stocbio")
    assert first_logreg_stocbio.problem_params == '{"n_features":5}'
    assert first_logreg_stocbio.algorithm_params == '{"batch_size":8}'
    assert first_logreg_stocbio.pipeline_params == '{"lam":-1.0}'
    assert first_logreg_stocbio.pipeline == "hypergradient_error"


def test_unsatisfied_requires_is_skipped_and_reported():
    assert "minibatch" in algorithms.spec("stocbio").requires
    spec = study(problems=["ridge", "quadratic"], algorithms=["aid_cg", "stocbio"])
    got = {(c.problem, c.algorithm) for c in expand(spec)}
    assert got == {("ridge", "aid_cg"), ("ridge", "stocbio"), ("quadratic", "aid_cg")}
    skipped = skipped_combinations(spec)
    assert [(s.problem, s.algorithm) for s in skipped] == [("quadratic", "stocbio")]
    assert "minibatch" in skipped[0].reason
    counts = {(p.problem, p.algorithm): p.cells for p in pair_counts(spec)}
    assert counts[("quadratic", "stocbio")] == 0
    # aid_cg and stocbio on ridge, aid_cg on quadratic: 3 pairs × (2 t × 2 K lines) × 2 seeds
    assert sum(counts.values()) == count_cells(spec) == len(list(expand(spec))) == 24
    assert plan(spec).skipped == skipped


def test_a_study_of_only_skipped_pairs_is_an_error():
    with pytest.raises(StudyError, match="expands to no cells.*quadratic × stocbio"):
        study(problems=["quadratic"], algorithms=["stocbio"])


def test_cell_ids_are_deterministic():
    first = [c.cell_id for c in expand(study())]
    second = [c.cell_id for c in expand(study())]
    assert first == second and len(set(first)) == len(first)
    # a changed parameter changes the id, so resumed studies never mix experiments
    other = [c.cell_id for c in expand(study(pipeline_params={"lam": 0.5}))]
    assert not set(first) & set(other)


def test_seeds_int_form_means_range():
    assert study(seeds=3).seeds == (0, 1, 2)
    assert study(seeds=[4, 7]).seeds == (4, 7)
    assert {c.seed for c in cells(seeds=3)} == {0, 1, 2}


def test_same_problem_twice_with_different_params():
    spec = study(problems=[{"name": "ridge", "params": {"n_train": 20}},
                           {"name": "ridge", "params": {"n_train": 40}}])
    labels = [p.problem for p in pair_counts(spec)]
    assert labels[0] != labels[2] and labels[0].startswith("ridge")
    assert count_cells(spec) == 2 * len(list(expand(study())))


def test_plan_of_100000_cells_streams_in_seconds():
    spec = study(problems=["ridge", "logreg"],
                 algorithms=["aid_cg", "aid_fp", "aid_neumann", "tbptt", "stocbio"],
                 backend=["jax", "torch"], t=list(range(1, 51)), K=list(range(10)),
                 seeds=10)
    start = time.perf_counter()
    summary = plan(spec)  # expands every cell and checks that the ids are unique
    elapsed = time.perf_counter() - start
    print(f"\nplan of {summary.total} cells: {elapsed:.2f} s")
    assert summary.total == count_cells(spec) == 2 * 5 * 2 * 50 * 10 * 10 == 100_000
    assert len(summary.sample_cell_ids) == 10


# --- validation messages ---------------------------------------------------------------

BAD = [
    (dict(seeds_=[1]), r"^unknown key 'seeds_'\. Valid keys: study, pipeline, "),
    (dict(algorithms=["itd", "aid_cg", "aid-cgg"]),
     r"^algorithms\[2\]: unknown algorithm 'aid-cgg'\. Valid choices: itd, itd_forward, "),
    (dict(algorithms=[{"name": "stocbio", "params": {"batchsize": 3}}]),
     r"^algorithms\[0\]\.params\.batchsize: unknown parameter for algorithm 'stocbio'\. "
     r"Valid choices: batch_size, neumann_lr$"),
    (dict(problems=[{"name": "ridge", "params": {"n_trian": 3}}]),
     r"^problems\[0\]\.params\.n_trian: unknown parameter for problem 'ridge'\. Valid "
     r"choices: .*n_train"),
    (dict(problems=[{"name": "ridge", "params": {"n_train": "1OO"}}]),
     r"^problems\[0\]\.params\.n_train: expected a value like the default 100"),
    (dict(problems=["ridge", "ridge"]), r"^problems\[1\]: repeats problems\[0\]"),
    (dict(problems=[]), r"^problems: must list at least one problem$"),
    (dict(backend=["jax", "tensorflow"]),
     r"^backend\[1\]: unknown backend 'tensorflow'\. Valid choices: jax, torch$"),
    # the catalog's pipelines, then the test plugin's (tests/sweep_test_pipeline.py)
    (dict(pipeline="hpx"), r"^pipeline: unknown pipeline 'hpx'\. Valid choices: "
                           r"hypergradient_error, hpo, blackbox(, [a-z_]+)*$"),
    (dict(pipeline=...), r"^pipeline: required key is missing$"),
    (dict(dtype="float16"), r"^dtype: unknown dtype 'float16'\. Valid choices: float32, "
                            r"float64$"),
    (dict(t=[10, 0]), r"^t\[1\]: must be an integer >= 1, got 0$"),
    (dict(t=[2.5]), r"^t\[0\]: must be an integer >= 1, got 2\.5$"),
    (dict(t=[10, 10]), r"^t\[1\]: repeats t\[0\]"),
    (dict(K=[3, -1]), r"^K\[1\]: must be an integer >= 0 or \"t\""),
    (dict(K=["T"]), r"^K\[0\]: must be an integer >= 0 or \"t\""),
    (dict(seeds=[-1]), r"^seeds\[0\]: must be an integer >= 0, got -1$"),
    (dict(seeds=0), r"^seeds: an integer n means seeds 0\.\.n-1 and must be >= 1"),
    (dict(resources={"num_gpus": -1}), r"^resources\.num_gpus: must be >= 0, got -1$"),
    (dict(resources={"num_gpus": 0.00001}),
     r"^resources\.num_gpus: fractions must be multiples of 0\.0001"),
    (dict(resources={"num_cpus": 1.5}), r"^resources\.num_cpus: quantities above 1 must be "),
    (dict(resources={"num_cpus": 0}), r"^resources\.num_cpus: must be > 0 unless num_gpus"),
    (dict(resources={"gpus": 1}), r"^resources: unknown key 'gpus'\. Valid keys: num_cpus, "
                                  r"num_gpus, memory_mb$"),
    (dict(cell_timeout_s=0), r"^cell_timeout_s: must be > 0, got 0$"),
    (dict(max_retries=-1), r"^max_retries: must be an integer >= 0, got -1$"),
    (dict(num_actors=0), r"^num_actors: must be an integer >= 1, got 0$"),
    (dict(mlflow={"enabled": "yes"}), r"^mlflow\.enabled: must be true or false"),
    (dict(pipeline_params={"lam": float("nan")}),
     r"^pipeline_params\.lam: must be a finite number"),
    (dict(study="has space"), r"^study: must be a name of letters"),
    # every error is listed, each with its key
    (dict(t=[0], K=[-1]), r"^t\[0\]: must be an integer >= 1, got 0; K\[0\]: .*-1"),
    (dict(t=[0], seeds=0, max_retries=-1),
     r"^t\[0\]: .*; seeds: .*; max_retries: must be an integer >= 0, got -1$"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_study_is_one_line_naming_the_key(changes, message):
    with pytest.raises(StudyError, match=message) as info:
        study(**changes)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_valid_edge_values():
    assert study(resources={"num_cpus": 0, "num_gpus": 0.25}).resources.num_gpus == 0.25
    assert study(resources={"num_gpus": 0.0001}).resources.num_gpus == 0.0001
    assert study(cell_timeout_s=0.5, max_retries=0).max_retries == 0
    assert study(backend="torch", t=7).t == (7,)  # scalars stand for one-element lists


@pytest.mark.parametrize("text, message", [
    ("study: [a\nb: c\n", r"^malformed YAML at line 2, column 2: "),
    ("study: a\nstudy: b\n", r"^malformed YAML at line 2.*duplicate key 'study' \(first "
                             r"set on line 1\)"),
    ("- a\n- b\n", r"^must be a mapping with keys study, pipeline"),
    ("", r"^the study is empty"),
])
def test_malformed_yaml(text, message):
    with pytest.raises(StudyError, match=message) as info:
        parse_study(text)
    assert "\n" not in str(info.value)


def test_yaml_exponent_floats_are_numbers():
    # PyYAML's YAML 1.1 reads 1e-4 as a string; studies read it as the number it looks like
    spec = parse_study(study_text() + "resources: {num_gpus: 1e-4}\ncell_timeout_s: 3e2\n")
    assert spec.resources.num_gpus == 1e-4 and spec.cell_timeout_s == 300.0


def test_load_study_names_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(study_text(t=[0]))
    with pytest.raises(StudyError, match=rf"^{path}: t\[0\]: must be"):
        load_study(path)
    with pytest.raises(StudyError, match="not found"):
        load_study(tmp_path / "missing.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
