"""Notation used across hypersweep (docstrings, column names, CLI flags).

=========  ===================================================================
symbol     meaning
=========  ===================================================================
w          inner variable (model weights), any array shape
λ (lam)    hyperparameters, in the parametrization each problem documents
           (e.g. log-penalty h with penalty = exp(h))
L_in       inner (training) objective L_in(w, λ)
L_out      outer (validation) objective L_out(w, λ)
w*(λ)      exact inner solution argmin_w L_in(w, λ)
F(λ)       value function L_out(w*(λ), λ); ``problem.value(lam)``
∇F(λ)      the exact hypergradient; ``problem.exact_hypergradient(lam)``
η          inner step size ``problem.inner_lr`` (default 1/L from a Lipschitz bound)
Φ          inner map Φ(w, λ) = w − η ∇_w L_in(w, λ); a contraction with factor
           q = 1 − η μ where L_in is μ-strongly convex in w
w_0        inner starting point (zeros unless ``w_init`` is given)
t          number of inner steps: w_t = Φ(w_{t−1}, λ)
K          linear-system budget (AID: solver iterations, an upper bound for CG,
           which stops at a residual tolerance), truncation length (tbptt),
           Neumann terms (aid_neumann, stocbio)
v          adjoint: solution of (I − ∂_wΦ)ᵀ v = ∇_w L_out(w_t, λ)
hypergrad  ∇_λ L_out(w_t, λ) + ∂_λΦ(w_t, λ)ᵀ v   (AID form)
=========  ===================================================================
"""
