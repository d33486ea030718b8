"""Channel importance criteria. Generic: they see a group's weight slices, never op types."""
from __future__ import annotations

from typing import Callable

import numpy as np

from graphprune.dependency import ChannelGroup, GroupMember

__all__ = ["CRITERIA", "register_criterion", "criterion_names", "member_slices", "Criterion"]

Criterion = Callable[[ChannelGroup, "ScoreContext"], np.ndarray]
CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, fn: Criterion | None = None):
    """Register `fn(group, sctx) -> scores[channels]` (higher = more important) under `name`.

    Usable as a decorator: ``@register_criterion("mine")``.
    """
    def deco(f: Criterion) -> Criterion:
        CRITERIA[name] = f
        return f

    return deco(fn) if fn is not None else deco


def criterion_names() -> list[str]:
    return sorted(CRITERIA)


def member_slices(member: GroupMember, values: np.ndarray) -> np.ndarray:
    """The member's weight values as a [channels, -1] matrix (one row per channel)."""
    lens = {len(ix) for ix in member.indices}
    moved = np.moveaxis(values, member.axis, 0)
    if len(lens) == 1:
        idx = np.stack(member.indices)
        return moved[idx.reshape(-1)].reshape(len(member.indices), -1)
    rows = [moved[ix].reshape(-1) for ix in member.indices]
    width = max(r.size for r in rows)
    return np.stack([np.pad(r, (0, width - r.size)) for r in rows])


def _magnitude(group: ChannelGroup, sctx, p: int) -> np.ndarray:
    total = np.zeros(group.size, dtype=np.float64)
    for m in group.weight_members():
        w = member_slices(m, sctx.values(m.tensor)).astype(np.float64)
        total += np.abs(w).sum(1) if p == 1 else (w * w).sum(1)
    return total if p == 1 else np.sqrt(total)


@register_criterion("l1")
def l1_magnitude(group: ChannelGroup, sctx) -> np.ndarray:
    """Sum of |w| over every weight slice of the channel (producers and consumers)."""
    return _magnitude(group, sctx, 1)


@register_criterion("l2")
def l2_magnitude(group: ChannelGroup, sctx) -> np.ndarray:
    """Euclidean norm of all the channel's weight slices together."""
    return _magnitude(group, sctx, 2)


@register_criterion("random")
def random_scores(group: ChannelGroup, sctx) -> np.ndarray:
    """Seeded random scores (a baseline)."""
    return sctx.rng.random(group.size)
