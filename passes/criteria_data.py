"""Data-aware criteria: BN scale, Wanda, FLAP fluctuation, OBS saliency, data-free OBS.

Like every criterion they are generic: they read a group's members and the statistics
the :class:`~passes.score.ScoreContext` keys by (tensor, axis), never op types. The
"reduce" members (the consumers' input columns) carry the activation-aware terms.
"""
from __future__ import annotations

import numpy as np

from graphprune.dependency import ROLE_OUT, ROLE_PARAM, ROLE_REDUCE, ChannelGroup

from .criteria import _magnitude, register_criterion

__all__ = ["bn_scale", "wanda", "flap", "obs", "obs_free", "obs_saliency", "OBS_DAMP", "OBS_FREE_DAMP",
           "FLAP_OFFSET"]

OBS_DAMP = 0.01        # Hessian dampening, a fraction of its mean diagonal
OBS_FREE_DAMP = 0.1    # data-free: synthetic activations are a rougher Hessian, lean toward H = I
FLAP_OFFSET = 1e3      # z-scores are shifted by a constant common to all groups (see flap)


def _element_norms(values: np.ndarray, axis: int) -> np.ndarray:
    """‖W[..., e, ...]‖₂² for every element e of `axis` (the column norms of a consumer)."""
    moved = np.moveaxis(np.asarray(values, np.float64), axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    return np.einsum("ij,ij->i", flat, flat)


def _per_channel(member, per_element: np.ndarray) -> np.ndarray:
    return np.array([per_element[ix].sum() for ix in member.indices])


def _activation_terms(group: ChannelGroup, sctx, term, *, data_free: bool = False) -> np.ndarray | None:
    """Σ over reduce members with statistics of term(column norm², stats) per channel."""
    total, seen = np.zeros(group.size), False
    for m in group.weight_members((ROLE_REDUCE,)):
        st = sctx.activation_stats(m, data_free=data_free)
        if st is None:
            continue
        col2 = _element_norms(sctx.values(m.tensor), m.axis)
        total += _per_channel(m, term(col2, st))
        seen = True
    return total if seen else None


@register_criterion("bn-scale")
def bn_scale(group: ChannelGroup, sctx) -> np.ndarray:
    """Network slimming: |γ| of the per-channel scales (BN, norm or Mul constants) of the group.

    When the exporter folded BN into the convolutions there is no γ left; the folded
    equivalent |γ|/σ·‖W_row‖ is the L2 norm of the producer rows, which is used then.
    """
    total, seen = np.zeros(group.size), False
    for m in group.members:
        if m.role == ROLE_PARAM and sctx.is_scale(m):
            v = np.abs(np.asarray(sctx.values(m.tensor), np.float64))
            v = np.moveaxis(v, m.axis, 0).reshape(v.shape[m.axis], -1).sum(1)
            total += _per_channel(m, v)
            seen = True
    if seen:
        return total
    rows = np.zeros(group.size)
    for m in group.weight_members((ROLE_OUT,)):
        rows += _per_channel(m, _element_norms(sctx.values(m.tensor), m.axis))
    return np.sqrt(rows)


@register_criterion("wanda")
def wanda(group: ChannelGroup, sctx) -> np.ndarray:
    """Wanda, per channel: Σ over consumer columns of ‖W_col‖₂ · ‖X_col‖₂ (calibration norms)."""
    s = _activation_terms(group, sctx, lambda col2, st: np.sqrt(col2) * st.norm)
    return s if s is not None else _magnitude(group, sctx, 2)


@register_criterion("flap")
def flap(group: ChannelGroup, sctx) -> np.ndarray:
    """FLAP fluctuation: Σ Var(X_col) · ‖W_col‖₂², standardised within the group.

    FLAP ranks layers globally by z-scores. The allocator divides each group's scores by
    their mean, so the z-scores are shifted by one constant (`FLAP_OFFSET`) shared by all
    groups: the normalised score is then 1 + z / FLAP_OFFSET, which orders channels of all
    groups exactly as the z-scores do.
    """
    s = _activation_terms(group, sctx, lambda col2, st: st.var * col2)
    if s is None:
        s = _magnitude(group, sctx, 2) ** 2
    std = s.std()
    z = (s - s.mean()) / std if std > 0 else np.zeros_like(s)
    return z + FLAP_OFFSET


def obs_saliency(h, weight: np.ndarray, member, damp: float) -> np.ndarray:
    """Per channel: the consumer's output-error increase when the channel's features are removed
    and the kept ones optimally re-fit (OBS for a block S): Σ_rows w_S (H⁻¹_SS)⁻¹ w_Sᵀ.

    `h` is :class:`~graphprune.activations.HessianStats` (XᵀX per row and the feature view).
    """
    view = h.view
    H = h.hessian()
    d = float(np.mean(np.diag(H))) if H.size else 0.0
    H = H + (damp * d if d > 0 else 1e-8) * np.eye(H.shape[0])
    try:
        Hinv = np.linalg.inv(H)
    except np.linalg.LinAlgError:
        Hinv = np.linalg.pinv(H)
    W = view.weight_matrix(np.asarray(weight, np.float64))
    out = np.zeros(len(member.indices))
    feats = [view.element_features(ix) for ix in member.indices]
    sizes = {len(f) for f in feats}
    if len(sizes) == 1:  # batched: one inverse of a small block per channel
        idx = np.stack(feats)                                 # [C, s]
        blocks = Hinv[idx[:, :, None], idx[:, None, :]]       # [C, s, s]
        inv_blocks = np.linalg.inv(blocks)
        ws = W[:, idx]                                        # [O, C, s]
        out = np.einsum("ocs,cst,oct->c", ws, inv_blocks, ws)
    else:
        for c, f in enumerate(feats):
            wf = W[:, f]
            out[c] = np.einsum("os,st,ot->", wf, np.linalg.inv(Hinv[np.ix_(f, f)]), wf)
    return np.maximum(out, 0.0)


def _obs(group: ChannelGroup, sctx, data_free: bool, damp: float) -> np.ndarray:
    total, seen = np.zeros(group.size), False
    missing = []
    for m in group.weight_members((ROLE_REDUCE,)):
        h = sctx.hessian(m, data_free=data_free)
        if h is None:
            missing.append(m)
            continue
        total += obs_saliency(h, sctx.values(m.tensor), m, damp)
        seen = True
    for m in missing:  # consumers without a Hessian (grouped/transposed convs): diagonal OBS
        st = sctx.activation_stats(m, data_free=data_free)
        if st is not None:
            total += _per_channel(m, _element_norms(sctx.values(m.tensor), m.axis) * st.second_moment)
            seen = True
    return total if seen else _magnitude(group, sctx, 2) ** 2


@register_criterion("obs")
def obs(group: ChannelGroup, sctx) -> np.ndarray:
    """OBS/Hessian saliency from H = XᵀX of each consumer over the calibration data."""
    return _obs(group, sctx, False, OBS_DAMP)


@register_criterion("obs-free")
def obs_free(group: ChannelGroup, sctx) -> np.ndarray:
    """Data-free OBS (in the spirit of OBSPA): the same saliency with H = XᵀX of activations
    that synthetic inputs (standard-normal images, uniform token ids) induce in the model.

    The weights, folded biases and nonlinearities still shape those activations, so H keeps
    the channel correlations OBS needs to see which channels the others can re-create; it
    does not know the data distribution, so it is dampened 10x more (toward H = I, where
    OBS reduces to the consumers' column magnitudes).
    """
    return _obs(group, sctx, True, OBS_FREE_DAMP)
