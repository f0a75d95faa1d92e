"""One ``register(ProblemSpec(...))`` per problem: pure data, no torch or jax.

``small`` is each problem's test instance: its inner map contracts with q ≲ 0.9 (so the
generic tests reach q^t ≤ 1e-10 in ≲ 220 steps) and dim w ≤ 200 except data_cleaning's
(650), which is still cheap at n_train = 20.
"""
from hypersweep.registry import ProblemSpec, Registry

PROBLEMS: Registry[ProblemSpec] = Registry("problem")

PROBLEMS.register(ProblemSpec(
    name="ridge",
    summary="Ridge regression: MSE + (λ/2)‖w‖², validation MSE outer (ridge tutorial).",
    reference="Pedregosa 2016; the ridge-regression tutorial hypersweep grew from",
    impl="hypersweep.problems.ridge",
    lam_parametrization="h = log λ (scalar, or one per feature with per_feature=True)",
    capabilities=frozenset({"minibatch", "closed_form"}),
    params=dict(n_features=25, n_train=100, n_val=50, n_test=0, train_noise=2.0,
                val_noise=0.3, per_feature=False, lam0=0.0),
    small=dict(n_features=5, n_train=30, n_val=20, per_feature=True),
    search_box=(-6.0, 3.0),
))
PROBLEMS.register(ProblemSpec(
    name="logreg",
    summary="ℓ2-regularized binary logistic regression, one penalty per feature (or one "
            "shared: penalty=shared).",
    reference="Grazzi et al. 2020; Ji, Yang & Liang 2021 (20 Newsgroups)",
    impl="hypersweep.problems.logreg",
    lam_parametrization="h = log λ, one per feature (penalty ½ Σ exp(h_i) w_i²); "
                        "penalty=shared: one h (½ exp(h) ‖w‖²)",
    capabilities=frozenset({"minibatch"}),
    params=dict(dataset="synthetic", n_train=200, n_val=150, n_test=150, n_features=20,
                lam0=-2.0, penalty="per_feature"),  # 500 examples: fits breast_cancer's 569
    small=dict(n_train=40, n_val=40, n_test=10, n_features=5),
    search_box=(-6.0, 3.0),  # log penalty per feature
))
PROBLEMS.register(ProblemSpec(
    name="kernel_ridge",
    summary="Kernel ridge regression with an RBF kernel; log bandwidth and log penalty.",
    reference="Grazzi et al. 2020",
    impl="hypersweep.problems.kernel_ridge",
    lam_parametrization="[log γ, log μ]: RBF exp(−γ‖x−x'‖²), penalty μ",
    capabilities=frozenset({"closed_form"}),
    params=dict(n_train=100, n_val=100, n_test=100, n_features=10, lam0=(-2.0, -1.0)),
    # penalty e^0 (default e^-1) brings q from 0.965 to 0.85
    small=dict(n_train=20, n_val=20, n_test=10, n_features=3, lam0=(-1.0, 0.0)),
    search_box=(-6.0, 3.0),
))
PROBLEMS.register(ProblemSpec(
    name="biased_reg",
    summary="Biased regularization across tasks: task ridges pulled towards a shared bias λ.",
    reference="Grazzi et al. 2020; Denevi et al. 2019",
    impl="hypersweep.problems.biased_reg",
    lam_parametrization="λ = shared bias vector (d,), no transform",
    capabilities=frozenset({"closed_form"}),
    params=dict(n_tasks=10, n_features=20, n_train=20, n_val=20, mu=1.0),
    small=dict(n_tasks=3, n_features=4, n_train=8, n_val=8),
))
PROBLEMS.register(ProblemSpec(
    name="hyper_rep",
    summary="Hyper-representation: a linear representation λ shared by per-task ridge heads.",
    reference="Grazzi et al. 2020; Franceschi et al. 2018",
    impl="hypersweep.problems.hyper_rep",
    lam_parametrization="λ = representation matrix P (d, p), no transform",
    capabilities=frozenset({"closed_form"}),
    params=dict(n_tasks=10, n_features=20, n_hidden=5, n_train=20, n_val=20, mu=1.0),
    small=dict(n_tasks=3, n_features=4, n_hidden=2, n_train=8, n_val=8),
))
PROBLEMS.register(ProblemSpec(
    name="data_cleaning",
    summary="Data hyper-cleaning: multinomial logistic regression, weight σ(λ_i) per example.",
    reference="Franceschi et al. 2017; Ji, Yang & Liang 2021 (MNIST)",
    impl="hypersweep.problems.data_cleaning",
    lam_parametrization="λ_i = logit of example i's weight σ(λ_i), one per training example",
    capabilities=frozenset({"minibatch"}),
    params=dict(dataset="digits", n_train=300, n_val=300, n_test=300, corruption=0.3,
                reg=1e-2, lam0=0.0),
    # reg 0.5 (default 1e-2) brings q from 0.996 to 0.85; λ has one entry per train row
    small=dict(n_train=20, n_val=20, n_test=20, reg=0.5),
    search_box=(-6.0, 6.0),  # logits of the example weights
))
PROBLEMS.register(ProblemSpec(
    name="quadratic",
    summary="Strongly convex quadratic bilevel problem with a set condition number.",
    reference="benchopt-style synthetic benchmark; Grazzi et al. 2020 (rates)",
    impl="hypersweep.problems.quadratic",
    lam_parametrization="λ ∈ R^p enters the inner linear term, no transform",
    capabilities=frozenset({"closed_form"}),
    params=dict(dim_inner=20, dim_outer=5, cond=10.0, mu=1.0, rho=0.01),
    small=dict(dim_inner=8, dim_outer=3),
))
PROBLEMS.register(ProblemSpec(
    name="quadratic_sum",
    summary="Finite-sum quadratic bilevel problem (benchmark_bilevel's simulated data).",
    reference="Dagréou et al. 2022 (benchopt/benchmark_bilevel, 'simulated')",
    impl="hypersweep.problems.quadratic_sum",
    lam_parametrization="λ = x ∈ R^d, the outer variable, no transform",
    capabilities=frozenset({"minibatch", "closed_form"}),
    params=dict(n_samples=1024, n_samples_outer=1024, dim_inner=10, dim_outer=10,
                mu_inner=0.1, l_cross=0.1, lam0=-2.0),
    small=dict(n_samples=40, n_samples_outer=30, dim_inner=4, dim_outer=3, mu_inner=0.5),
))
PROBLEMS.register(ProblemSpec(
    name="sparse_logreg",
    summary="ℓ2 logistic regression on sparse features (CSR, kept sparse), one penalty per "
            "feature.",
    reference="Ji, Yang & Liang 2021 (stocBiO, 20 Newsgroups); Pedregosa 2016",
    impl="hypersweep.problems.sparse_logreg",
    lam_parametrization="h = log λ, one per feature (penalty ½ Σ exp(h_i) w_i²)",
    capabilities=frozenset({"minibatch"}),
    # a moderate 20-news-shaped corpus, small enough (d = 4000) for the dense Hessian that
    # contraction factors need; studies pass the published shape (n ≈ 11k, d ≈ 130k,
    # density 1e-3) or data= an svmlight file
    params=dict(dataset="news20_shaped", n_train=2000, n_val=1000, n_test=1000,
                n_features=4000, density=5e-3, lam0=-2.0, zero_based=False),
    small=dict(n_train=60, n_val=40, n_test=20, n_features=80, density=0.05),
    search_box=(-6.0, 3.0),  # log penalty per feature
))
PROBLEMS.register(ProblemSpec(
    name="multiclass_logreg",
    summary="Multiclass logistic regression, one ℓ2 penalty per class (covtype-style).",
    reference="Dagréou et al. 2022 (benchmark_bilevel, covtype)",
    impl="hypersweep.problems.multiclass_logreg",
    lam_parametrization="h = log λ, one per class (penalty ½ Σ_c exp(h_c) ‖W_c‖²)",
    capabilities=frozenset({"minibatch"}),
    params=dict(dataset="covtype_shaped", n_train=1000, n_val=500, n_test=500, lam0=-2.0),
    # penalty e^0 (default e^-2): a better-conditioned inner problem for the generic tests
    small=dict(n_train=60, n_val=40, n_test=20, lam0=0.0),
    search_box=(-6.0, 3.0),
))
