"""Template plugin: registers the template problem, estimator and pipeline at import.

An entry inside the package goes in ``hypersweep/problems/catalog.py``,
``hypersweep/algorithms/catalog.py`` or ``hypersweep/pipelines/catalog.py`` instead,
written the same way. Outside the package, name this module in ``$HYPERSWEEP_PLUGINS``
(comma-separated module names): the CLI, the driver, every actor and the test suite import
it through :func:`hypersweep.registry.load_plugins`. The module paths below assume the
templates were copied next to this one as ``template_problem.py``,
``template_estimator_jax.py``, ``template_estimator_torch.py`` and ``template_pipeline.py``.
"""
from hypersweep.algorithms.catalog import ALGORITHMS
from hypersweep.pipelines.catalog import PIPELINES
from hypersweep.problems.catalog import PROBLEMS
from hypersweep.registry import AlgorithmSpec, PipelineSpec, ProblemSpec

PROBLEMS.register(ProblemSpec(
    name="template_problem",
    summary="Tikhonov denoising: one smoothing weight exp(h_j) per neighbour pair.",
    reference="docs/templates/problem.py (a template)",
    impl="template_problem",
    lam_parametrization="h = log smoothing weight, one per neighbour pair (d − 1,)",
    capabilities=frozenset({"closed_form"}),
    params=dict(dim=6, noise=0.5, lam0=0.0),
    small=dict(dim=5),  # the instance the generic tests build
))
ALGORITHMS.register(AlgorithmSpec(
    name="template_estimator",
    summary="First-order: ∇_λ L_out(w_t, λ) only (a template; drops the implicit term).",
    reference="docs/templates/estimator_jax.py (a template)",
    impls={"jax": "template_estimator_jax:template_estimator",
           "torch": "template_estimator_torch:template_estimator"},
    consistent=False,  # biased by design: the generic tests check it is not ∇F
))
PIPELINES.register(PipelineSpec(
    name="template_pipeline",
    summary="One hypergradient estimate at λ₀ + shift, scored against the oracle.",
    run="template_pipeline:run",
    algorithm_kinds=("estimator",),
    params_model="template_pipeline:TemplateParams",
))
