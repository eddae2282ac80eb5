"""The paper's bounds on the entropy of each reverse step (Sohl-Dickstein et al. 2015, section 2.6
and App. A; "bounds on entropy production" in the talk), from forward-process entropies alone.

Each process gives its forward entropies in closed form (Gaussian entropies of its beta table,
Bernoulli entropies of its kernel and marginals); the identity that turns them into bounds is here,
once. Entropies are per example (summed over dimensions), in nats, float64.
"""

from torch import Tensor


def reverse_entropy_bounds(forward_step: Tensor, given_x0: Tensor) -> tuple[Tensor, Tensor]:
    """(lower, upper) bounds on H_q(X_{t-1} | X_t) for t = 2..T (paper section 2.6, App. A):

        H_q(X_t|X_{t-1}) + H_q(X_{t-1}|X_0) - H_q(X_t|X_0)  <=  H_q(X_{t-1}|X_t)  <=  H_q(X_t|X_{t-1})

    from ``forward_step`` = H_q(X_t | X_{t-1}) and ``given_x0`` = H_q(X_t | X_0), both for t = 1..T.
    Exactly, H_q(X_{t-1}|X_t) = H_q(X_t|X_{t-1}) + H_q(X_{t-1}) - H_q(X_t). The lower bound is
    H_q(X_{t-1}|X_t, X_0) (conditioning on X_0 can only remove entropy; the chain is Markov, so
    H(X_{t-1}, X_t | X_0) = H(X_{t-1}|X_0) + H(X_t|X_{t-1})): it holds for any data. The upper bound
    takes H_q(X_t) >= H_q(X_{t-1}), true when the marginal entropy never falls along the chain (data
    carrying no more entropy than the stationary distribution, e.g. unit-variance Gaussian data or
    any data under a uniform binary kernel)."""
    step = forward_step[1:]
    return step + given_x0[:-1] - given_x0[1:], step
