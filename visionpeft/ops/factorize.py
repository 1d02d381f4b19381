"""Integer factorisations that methods use to split a layer's sizes (KronA's factors,
Block-LoRA's blocks)."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def sqrt_factor(n: int) -> int:
    """The largest divisor of n not above sqrt(n): the most balanced split n = f * (n/f)."""
    return max(d for d in divisors(n) if d * d <= n)
