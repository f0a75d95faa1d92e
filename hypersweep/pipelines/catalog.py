"""One ``register(PipelineSpec(...))`` per pipeline: pure data, no torch or jax."""
from hypersweep.registry import PipelineSpec, Registry

PIPELINES: Registry[PipelineSpec] = Registry("pipeline")

PIPELINES.register(PipelineSpec(
    name="hypergradient_error",
    summary="Hypergradient error vs the float64 oracle, per (problem, algorithm, t, K, seed).",
    run="hypersweep.pipelines.hypergradient_error:run",
    run_batch="hypersweep.pipelines.hypergradient_error:run_batch",
    cost="hypersweep.pipelines.hypergradient_error:cost",
    algorithm_kinds=("estimator",),
    params_model="hypersweep.pipelines.params:HypergradientErrorParams",
))
PIPELINES.register(PipelineSpec(
    name="hpo",
    summary="Gradient-based HPO: an estimator, online method or bilevel solver drives λ "
            "(or a baseline keeps it at λ₀).",
    run="hypersweep.pipelines.hpo:run",
    algorithm_kinds=("estimator", "online", "solver", "baseline"),
    params_model="hypersweep.pipelines.params:HpoParams",
))
PIPELINES.register(PipelineSpec(
    name="blackbox",
    summary="Black-box HPO baseline: a Ray Tune searcher over the λ box.",
    run="hypersweep.pipelines.blackbox:run",
    algorithm_kinds=("searcher",),
    params_model="hypersweep.pipelines.params:BlackboxParams",
))
