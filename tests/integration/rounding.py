"""Checks of figures that the benchmarks print rounded."""


def ratio_agrees_with_rates(ratio: float, ours: float, base: float, rate_half: float, ratio_half: float) -> bool:
    """Whether `ratio` (rounded to +-ratio_half) can be ours / base with both rates rounded
    to +-rate_half: on a loaded machine the rates are small and their rounding, not the
    ratio's, sets the tolerance."""
    low = (ours - rate_half) / (base + rate_half) - ratio_half
    high = (ours + rate_half) / (base - rate_half) + ratio_half
    return low <= ratio <= high
