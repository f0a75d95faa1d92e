"""One ``register(AlgorithmSpec(...))`` per algorithm: pure data, no torch or jax."""
from hypersweep.registry import AlgorithmSpec, Registry

ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm")


def _impls(module: str, fn: str) -> dict:
    return {b: f"hypersweep.algorithms.{b}.{module}:{fn}" for b in ("jax", "torch")}


ALGORITHMS.register(AlgorithmSpec(
    name="itd",
    summary="Iterative differentiation: reverse mode through the t inner steps.",
    reference="Maclaurin et al. 2015; Franceschi et al. 2017; Grazzi et al. 2020",
    impls=_impls("itd", "itd"),
))
ALGORITHMS.register(AlgorithmSpec(
    name="itd_forward",
    summary="Iterative differentiation in forward mode (cost grows with dim λ).",
    reference="Franceschi et al. 2017 (RTHO / forward-mode)",
    impls=_impls("itd", "itd_forward"),
))
ALGORITHMS.register(AlgorithmSpec(
    name="tbptt",
    summary="Truncated backprop: reverse mode through the last K of the t steps.",
    reference="Shaban et al. 2019",
    impls=_impls("itd", "tbptt"), uses_K=True,
))
ALGORITHMS.register(AlgorithmSpec(
    name="aid_cg",
    summary="Approximate implicit differentiation; adjoint by ≤ K conjugate-gradient steps.",
    reference="Pedregosa 2016; Grazzi et al. 2020",
    impls=_impls("aid", "aid_cg"), uses_K=True,
))
ALGORITHMS.register(AlgorithmSpec(
    name="aid_fp",
    summary="Approximate implicit differentiation; adjoint by ≤ K fixed-point (Richardson) steps.",
    reference="Grazzi et al. 2020; Liao et al. 2018",
    impls=_impls("aid", "aid_fp"), uses_K=True,
))
ALGORITHMS.register(AlgorithmSpec(
    name="aid_neumann",
    summary="Approximate implicit differentiation; adjoint by a K-term Neumann series.",
    reference="Lorraine et al. 2020",
    impls=_impls("aid", "aid_neumann"), uses_K=True,
))
ALGORITHMS.register(AlgorithmSpec(
    name="aid_exact",
    summary="Implicit differentiation at w_t with a direct (dense) solve; small dim w only.",
    reference="Bengio 2000; Pedregosa 2016",
    impls=_impls("aid", "aid_exact"),
))
ALGORITHMS.register(AlgorithmSpec(
    name="stocbio",
    summary="stocBiO: minibatch SGD inner steps, minibatch Neumann adjoint with K terms.",
    reference="Ji, Yang & Liang 2021",
    impls=_impls("stochastic", "stocbio"), uses_K=True,
    requires=frozenset({"minibatch"}), params={"batch_size": 64, "neumann_lr": None},
))
ALGORITHMS.register(AlgorithmSpec(
    name="first_order",
    summary="First-order: ∇_λ L_out(w_t, λ) only (drops the implicit term).",
    reference="Finn et al. 2017 (FOMAML); Nichol et al. 2018",
    impls=_impls("itd", "first_order"),
))
ALGORITHMS.register(AlgorithmSpec(
    name="one_step",
    summary="One-step: differentiates only the last inner step.",
    reference="Luketina et al. 2016; Baydin et al. 2018",
    impls=_impls("itd", "one_step"),
))
