"""The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

n samples of a problem, c of them correct: the probability that at least one
of k samples drawn without replacement is correct. Computed as a product to
stay exact for large n.
"""

from __future__ import annotations

import math

from codeprune.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with ``c`` correct out of ``n`` samples (needs k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n, c) per problem."""
    if not counts:
        raise ConfigError("pass@k of no problems")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
