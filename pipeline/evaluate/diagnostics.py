"""What a KLoM figure hides: saturation and the direction of the shift (decision 33).

KLoM at a point is ``sum_{p>0} p log(p / max(q, floor)) = ln(1/floor) - H(p)`` where the oracles put no
mass, so it can never exceed ``ln(1/floor)`` (11.51 at the floor 1e-5): a method whose margins land
anywhere away from the oracles' scores near that ceiling whether it is a little off or a long way off.
A P95 within 10 % of the ceiling is *saturated*: two saturated rows are not ranked against each other.
The standardized margin shift says which way and how far: per point, the unlearned models' mean margin
minus the oracles' over the oracles' standard deviation; its median over a group, with its sign (negative:
the unlearned models are less confident in the label than retraining; positive: more, as a model that
still remembers its forget set).

Pure numpy on margins shaped ``(models, points)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["SATURATION_BAND", "ceiling", "diagnose", "is_saturated", "median_shift", "saturation_threshold",
           "share_at_ceiling",
           "standardized_shift"]

# A P95 (or a point's KLoM) at or above (1 - SATURATION_BAND) x the ceiling is saturated (decision 33).
SATURATION_BAND = 0.10


def ceiling(floor: float = 1e-5) -> float:
    """The largest value KLoM can take with the oracle histogram floored at ``floor``: ln(1/floor)."""
    return math.log(1.0 / floor)


def saturation_threshold(floor: float = 1e-5) -> float:
    return (1.0 - SATURATION_BAND) * ceiling(floor)


def is_saturated(p95: float | None, floor: float = 1e-5) -> bool | None:
    """Whether a P95 lies within ``SATURATION_BAND`` of the ceiling (None for an unknown P95)."""
    return None if p95 is None else bool(p95 >= saturation_threshold(floor))


def standardized_shift(unlearned: Any, oracle: Any) -> np.ndarray:
    """Per point ``(mean_u - mean_o) / sd_o`` of margins ``(models, points)``; NaN where the oracles'
    margins do not vary (sd 0: no scale to measure a shift in). ``sd_o`` is the sample SD (ddof 1; ddof 0
    for a single oracle, which gives NaN everywhere)."""
    u = np.asarray(unlearned, dtype=np.float64)
    o = np.asarray(oracle, dtype=np.float64)
    if u.ndim != 2 or o.ndim != 2 or u.shape[1] != o.shape[1]:
        raise ValueError(f"margins must be (models, points) with equal point counts; got {u.shape} and {o.shape}")
    sd = o.std(axis=0, ddof=1 if o.shape[0] > 1 else 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, (u.mean(axis=0) - o.mean(axis=0)) / sd, np.nan)


def median_shift(shift: np.ndarray, points: Any) -> float | None:
    """Median of the per-point shifts over ``points`` (indices), NaNs left out; None if none is left."""
    values = np.asarray(shift)[np.asarray(points)]
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else None


def share_at_ceiling(per_point: Any, points: Any, floor: float = 1e-5) -> float | None:
    """Fraction of ``points`` whose KLoM is within ``SATURATION_BAND`` of the ceiling."""
    values = np.asarray(per_point, dtype=np.float64)[np.asarray(points)]
    return float(np.mean(values >= saturation_threshold(floor))) if values.size else None


def diagnose(unlearned: Any, oracle: Any, per_point: Any, groups: dict[str, Any], p95: dict[str, float],
             floor: float = 1e-5) -> dict[str, dict]:
    """Per group: ``shift`` (median standardized margin shift), ``at_ceiling`` (share of points within
    the band of the ceiling) and ``saturated`` (the group's P95 is). ``groups`` maps a name to point
    indices, ``p95`` a name to that group's P95."""
    shift = standardized_shift(unlearned, oracle)
    return {g: {"shift": median_shift(shift, pts), "at_ceiling": share_at_ceiling(per_point, pts, floor),
                "saturated": is_saturated(p95.get(g), floor)}
            for g, pts in groups.items()}
