"""One ``register(AlgorithmSpec(...))`` per algorithm: pure data, no torch or jax.

This is the one list of algorithms and of their ``params`` (the defaults a study's
algorithm params are merged over); the pydantic model named by ``params_model``
(:mod:`hypersweep.algorithms.params`) checks the merged values and has exactly these keys.
"""
from hypersweep.registry import BACKENDS, AlgorithmSpec, Registry

ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm")


def _impls(module: str, fn: str) -> dict:
    return {b: f"hypersweep.algorithms.{b}.{module}:{fn}" for b in BACKENDS}


def _grid(fn: str) -> dict:
    """The t-grid form (``AlgorithmSpec.grid_impls``): ``algorithms/<backend>/grid.py``."""
    return {b: f"hypersweep.algorithms.{b}.grid:{fn}" for b in BACKENDS}


def _model(name: str) -> str:
    return f"hypersweep.algorithms.params:{name}"


ALGORITHMS.register(AlgorithmSpec(
    name="itd",
    summary="Iterative differentiation: reverse mode through the t inner steps.",
    reference="Maclaurin et al. 2015; Franceschi et al. 2017; Grazzi et al. 2020",
    impls=_impls("itd", "itd"), grid_impls=_grid("itd"), consistent=True,
))
ALGORITHMS.register(AlgorithmSpec(
    name="itd_forward",
    summary="Iterative differentiation in forward mode (cost grows with dim λ).",
    reference="Franceschi et al. 2017 (RTHO / forward-mode)",
    impls=_impls("itd", "itd_forward"), grid_impls=_grid("itd_forward"), consistent=True,
))
ALGORITHMS.register(AlgorithmSpec(
    name="tbptt",
    summary="Truncated backprop: reverse mode through the last K of the t steps.",
    reference="Shaban et al. 2019",
    impls=_impls("itd", "tbptt"), grid_impls=_grid("tbptt"), uses_K=True, consistent=True,
))
ALGORITHMS.register(AlgorithmSpec(
    name="aid_cg",
    summary="Approximate implicit differentiation; adjoint by ≤ K conjugate-gradient steps.",
    reference="Pedregosa 2016; Grazzi et al. 2020",
    impls=_impls("aid", "aid_cg"), grid_impls=_grid("aid_cg"), uses_K=True, consistent=True,
    warm_start_adjoint=True,
))
ALGORITHMS.register(AlgorithmSpec(
    name="aid_fp",
    summary="Approximate implicit differentiation; adjoint by ≤ K fixed-point (Richardson) steps.",
    reference="Grazzi et al. 2020; Liao et al. 2018",
    impls=_impls("aid", "aid_fp"), grid_impls=_grid("aid_fp"), uses_K=True, consistent=True,
    warm_start_adjoint=True,
))
ALGORITHMS.register(AlgorithmSpec(
    name="aid_neumann",
    summary="Approximate implicit differentiation; adjoint by a K-term Neumann series.",
    reference="Lorraine et al. 2020",
    # a Neumann series has no initial point: no adjoint warm start
    impls=_impls("aid", "aid_neumann"), grid_impls=_grid("aid_neumann"), uses_K=True,
    consistent=True,
))

ALGORITHMS.register(AlgorithmSpec(
    name="aid_exact",
    summary="Implicit differentiation at w_t with a direct (dense) solve; small dim w only.",
    reference="Bengio 2000; Pedregosa 2016",
    impls=_impls("aid", "aid_exact"), consistent=True,
))
ALGORITHMS.register(AlgorithmSpec(
    name="stocbio",
    summary="stocBiO: minibatch SGD inner steps, minibatch Neumann adjoint with K terms.",
    reference="Ji, Yang & Liang 2021",
    impls=_impls("stochastic", "stocbio"), uses_K=True,
    requires=frozenset({"minibatch"}), params={"batch_size": 64, "neumann_lr": None},
    params_model=_model("StocbioParams"), consistent=True,  # with full batches
))
ALGORITHMS.register(AlgorithmSpec(
    name="first_order",
    summary="First-order: ∇_λ L_out(w_t, λ) only (drops the implicit term).",
    reference="Finn et al. 2017 (FOMAML); Nichol et al. 2018",
    impls=_impls("itd", "first_order"), grid_impls=_grid("first_order"),
))
ALGORITHMS.register(AlgorithmSpec(
    name="one_step",
    summary="One-step: differentiates only the last inner step.",
    reference="Luketina et al. 2016; Baydin et al. 2018",
    impls=_impls("itd", "one_step"), grid_impls=_grid("one_step"),
))


# --- online methods (HPO pipeline) ---
# ``exact`` is the oracle ∇F(λ) (backend-free); the three online methods are
# ``OnlineMethod(init, step)`` pairs run by the HPO pipeline (see
# hypersweep/algorithms/online_common.py for what t and K mean for each). Their ``params``
# are every setting of the method besides the outer optimizer, with its default.
ALGORITHMS.register(AlgorithmSpec(
    name="exact",
    summary="The exact hypergradient ∇F(λ) from the problem's float64 oracle (w_t = w*).",
    reference="ridge tutorial: gradient descent on the exact value function",
    impls={b: "hypersweep.algorithms.oracle:exact" for b in BACKENDS},
))
ALGORITHMS.register(AlgorithmSpec(
    name="hyperdistill",
    summary="Online HyperDistill: EMA point w*, θ·Z_τ·α ∂_λΦ(w*); θ fit by a K-step DrMAD pass.",
    reference="Lee et al., ICLR 2022; DrMAD: Fu et al., IJCAI 2016",
    impls=_impls("online", "hyperdistill"), uses_K=True, kind="online",
    params={"gamma": 0.9, "theta0": 1.0, "theta_every": 10},
    params_model=_model("HyperdistillParams"),
))
ALGORITHMS.register(AlgorithmSpec(
    name="t1t2",
    summary="Online T1-T2: one-step hypergradient, mixed term by DARTS central differences.",
    reference="Luketina et al., ICML 2016; Liu, Simonyan & Yang, ICLR 2019 (DARTS)",
    impls=_impls("online", "t1t2"), kind="online", params={"fd_eps": 0.01},
    params_model=_model("T1t2Params"),
))
ALGORITHMS.register(AlgorithmSpec(
    name="greedy",
    summary="Online greedy: Σ γ^{T−s} ∇_w L_out(w_s)·∂_λΦ over a window of T = t steps.",
    reference="Generalized greedy gradient-based HPO (ICLR 2025 submission)",
    impls=_impls("online", "greedy"), kind="online", params={"gamma": 0.9},
    params_model=_model("GreedyParams"),
))

# --- baselines (hpo pipeline) ---
# kind="baseline": an estimator's signature, run by the hpo pipeline, which makes no outer
# update for it. ``fixed`` trains w as the estimators do (t steps of Φ per outer step) and
# never moves λ, so a study's table shows what tuning bought over λ₀.
ALGORITHMS.register(AlgorithmSpec(
    name="fixed",
    summary="No tuning: λ stays λ₀; each outer step trains w with t inner steps, as the "
            "estimators do (the reference row of an HPO table).",
    reference="the untuned baseline (λ₀) of any HPO comparison",
    impls=_impls("fixed", "fixed"), kind="baseline",
))

# --- bilevel solvers (hpo pipeline) ---
# kind="solver": ``get(name, backend)`` returns a ``Solver(init, step, samples, counts)``
# (hypersweep/algorithms/solvers_common.py has the interface, the sampler and the
# counting). Every hyperparameter is a ``params`` entry; the study's t and K are the
# estimators' budgets and do not apply to solvers (their budgets are params here).
# ``step_size`` None = the problem's η = 1/L; outer step = step_size / outer_ratio.
_SOLVER = {"step_size": None, "outer_ratio": 1.0, "batch_size": 64, "sampling": "replacement"}


def _solver(family: str, name: str, summary: str, reference: str, model: str,
            **params) -> AlgorithmSpec:
    return AlgorithmSpec(
        name=name, summary=summary, reference=reference,
        impls=_impls(f"solvers_{family}", name), kind="solver",
        requires=frozenset({"minibatch"}), params=params,
        params_model=_model(model))


for _spec in (
    # single loop: w, v and λ move together, one step each per iteration
    _solver("single", "soba", "SOBA: one SGD step each on w, on the linear system v, on λ.",
            "Dagréou, Ablin, Vaiter & Moreau, NeurIPS 2022", "SobaParams", **_SOLVER),
    _solver("single", "saba", "SABA: SOBA with SAGA memories on every direction.",
            "Dagréou, Ablin, Vaiter & Moreau, NeurIPS 2022", "SabaParams", **_SOLVER),
    _solver("single", "srba", "SRBA: SARAH-type recursive directions, full batch every period.",
            "Dagréou, Moreau, Vaiter & Ablin, AISTATS 2024", "SrbaParams", **_SOLVER,
            period=None),
    _solver("momentum", "fsla", "FSLA: fully single loop, STORM-type outer direction.",
            "Li, Gu & Huang, AAAI 2022", "FslaParams", **_SOLVER, momentum=0.5),
    _solver("momentum", "mrbo", "MRBO: STORM momentum on w and λ, HIA Neumann adjoint.",
            "Yang, Ji & Liang, NeurIPS 2021", "MrboParams", **_SOLVER, momentum=0.5,
            n_hia_steps=10, decay_offset=100.0),
    _solver("momentum", "sustain", "SUSTAIN: STORM momentum on w and λ, Neumann adjoint.",
            "Khanduri et al., NeurIPS 2021", "SustainParams", **_SOLVER, momentum=0.5,
            n_hia_steps=10, decay_offset=100.0),
    _solver("single", "ttsa", "TTSA: two-timescale SA, stochastic Neumann adjoint.",
            "Hong, Wai, Wang & Yang, SIAM J. Optim. 2023", "TtsaParams", **_SOLVER,
            n_hia_steps=10, decay_offset=1.0),
    _solver("single", "ma_soba", "MA-SOBA: SOBA with a moving average of the λ direction.",
            "Chen, Xiao & Balasubramanian, ICML 2023", "MaSobaParams", **_SOLVER,
            averaging=0.1),
    # two loops: inner steps (and a linear-system solve) per λ update
    _solver("double", "stocbio_solver", "stocBiO as a solver: warm SGD inner loop, "
            "minibatch Neumann adjoint.", "Ji, Yang & Liang, ICML 2021", "StocbioSolverParams",
            **_SOLVER, n_inner_steps=10, n_neumann_steps=10),
    _solver("double", "bsa", "BSA: SGD inner loop, stochastic Neumann (HIA) adjoint.",
            "Ghadimi & Wang 2018", "BsaParams", **_SOLVER, n_inner_steps=10, n_hia_steps=10,
            decay_exponent=0.5),
    _solver("double", "amigo", "AmIGO: SGD inner loop, warm-started SGD on the linear system.",
            "Arbel & Mairal, ICLR 2022", "AmigoParams", **_SOLVER, n_inner_steps=10,
            n_adjoint_steps=10),
    _solver("double", "vrbo", "VRBO: SARAH-type variance reduction, full batch every period.",
            "Yang, Ji & Liang, NeurIPS 2021", "VrboParams", **_SOLVER, n_inner_steps=3,
            n_neumann_steps=10, period=None),
    _solver("double", "hoag", "HOAG: deterministic; inner and CG solves to tolerances that "
            "decrease over the outer iterations.", "Pedregosa, ICML 2016", "HoagParams",
            step_size=None, outer_ratio=1.0, tol0=0.1, tol_decay=0.9,
            max_inner_steps=1000, max_cg_steps=100),
    # first / zeroth order: no second-order products
    _solver("first_order", "f2sa", "F2SA: fully first order, penalty with a growing "
            "multiplier.", "Kwon, Kwon, Wright & Nowak, ICML 2023", "F2saParams", **_SOLVER,
            n_inner_steps=10, multiplier0=1.0, multiplier_growth=0.01),
    _solver("first_order", "bome", "BOME: value-function penalty, first order.",
            "Liu, Ye, Wright, Stone & Liu, NeurIPS 2022", "BomeParams", **_SOLVER,
            n_inner_steps=10, bome_eta=0.5),
    _solver("first_order", "pzobo", "PZOBO: zeroth-order Jacobian by Gaussian smoothing.",
            "Sow, Ji & Liang, 2022", "PzoboParams", **_SOLVER, n_inner_steps=10,
            n_directions=10, smoothing=0.01),
):
    ALGORITHMS.register(_spec)


# --- black-box searchers (Ray Tune) ---
# kind="searcher": ``get(name, backend)`` returns a searcher factory
# ``fn(space, *, num_samples, seed, max_t, **params) -> TuneSearch`` (backend-free: both
# backends point at the same entry); the ``blackbox`` pipeline runs it. t = inner steps
# per trial, K unused. ``params`` are the searcher's options (algorithm params in a study).
def _searcher(fn: str) -> dict:
    return {b: f"hypersweep.algorithms.searchers:{fn}" for b in BACKENDS}


ALGORITHMS.register(AlgorithmSpec(
    name="grid",
    summary="Grid search over the λ box (Ray Tune BasicVariantGenerator); small dim λ only.",
    reference="Bergstra & Bengio 2012 (as the baseline random search beats)",
    impls=_searcher("grid"), kind="searcher", params={"grid_points": None},
    params_model=_model("GridParams"),
))
ALGORITHMS.register(AlgorithmSpec(
    name="random",
    summary="Uniform random search over the λ box (Ray Tune BasicVariantGenerator, seeded).",
    reference="Bergstra & Bengio 2012",
    impls=_searcher("random_search"), kind="searcher",
))
ALGORITHMS.register(AlgorithmSpec(
    name="tpe",
    summary="Tree-structured Parzen estimator (Optuna TPESampler via Ray Tune OptunaSearch).",
    reference="Bergstra et al. 2011; Akiba et al. 2019",
    impls=_searcher("tpe"), kind="searcher", params={"n_startup_trials": 10},
    params_model=_model("TpeParams"),
))
ALGORITHMS.register(AlgorithmSpec(
    name="hyperopt",
    summary="HyperOpt TPE via Ray Tune HyperOptSearch (seeded).",
    reference="Bergstra, Yamins & Cox 2013",
    impls=_searcher("hyperopt"), kind="searcher", params={"n_initial_points": 10},
    params_model=_model("HyperoptParams"),
))
ALGORITHMS.register(AlgorithmSpec(
    name="asha",
    summary="Random search + ASHA early stopping; the inner steps are the resource.",
    reference="Li et al. 2020 (ASHA)",
    impls=_searcher("asha"), kind="searcher",
    params={"grace_period": None, "reduction_factor": 3.0, "workers": 4,
            "report_every": None},
    params_model=_model("AshaParams"),
))
