"""Numeric comparisons shared by the tests, the benchmarks and the GPU self-test (no project imports)."""

import torch


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|, computed in float64.

    Absolute (max |actual - reference|) where the reference is exactly zero (e.g. dq at N=1), so the ratio
    never divides by zero.  A NaN anywhere in ``actual`` gives NaN, so every ``< tol`` check fails on it.
    The comparison runs on ``actual``'s device (the reference is copied there): a GPU result is compared
    on the GPU and only the scalar comes back.
    """
    actual = actual.detach().double()
    reference = reference.detach().to(device=actual.device, dtype=torch.float64)
    error = (actual - reference).abs().max()
    scale = reference.abs().max()
    return (error / torch.where(scale > 0, scale, torch.ones_like(scale))).item()
