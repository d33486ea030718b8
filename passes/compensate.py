"""Compensate: re-fit each consumer of removed channels so its output matches the original's.

For a consumer y = W·x (+ b) whose input features R were removed (features are the
contracted axis, im2col columns for convs), the kept weights W_K and a bias shift δ are
fitted by least squares on calibration data:

    min ‖ W·x_orig − (W_K'·x̃_K + δ) ‖²     over the calibration rows

x_orig is the consumer's input in the original model, x̃_K the same input in the pruned
model *with every upstream layer already compensated*: layers are done in topological
order, one wave of mutually independent layers per pass over the calibration data, so each
layer also corrects the error its pruned upstream introduced (sequential, as SparseGPT/OBC
do). When upstream is untouched this is exactly OBS's W_K += W_R·H_RK·H_KK⁻¹ plus the
mean (bias) term. Only the statistics of the current wave are held: XᵀX of the kept
features (K x K), their cross product with the target (K x O) and sums.

- ``bias``: δ only (FLAP): the removed channels' mean contribution, plus the mean shift
  the pruned upstream caused.
- ``obs``: W_K' and δ. Dampening pulls toward the uncompensated weights (a proximal
  term λ‖W_K' − W_K‖²), so the fit can never raise the calibration error of the layer;
  λ is chosen (or fixed with
  ``compensate_damp``) by generalised cross-validation, so an exactly representable
  removal is reconstructed exactly and a noisy fit is held back. GCV counts every row
  (a conv output position, a token) as an independent observation; with
  ``compensate_select="cv"`` λ is chosen instead by 2-fold cross-validation over calibration
  *batches* (fit on one half of the samples, score on the other), which also lets a layer
  keep its weights and re-fit only the bias when no weight update generalises.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.activations import ContractionView, SegmentRunner, find_views
from graphprune.cost import model_cost
from graphprune.oprules import rule_for
from graphprune.dependency import ROLE_REDUCE
from graphprune.graph import Model, tensor_shape
from graphprune.oprules.quant import dequant_weight
from graphprune.pipeline import Pass, PassResult, PruneContext

from .rewrite import kept_indices

__all__ = ["CompensatePass", "CompensationGuardPass", "COMPENSATE_MODES", "damp_floor", "LayerFit", "fit_layer", "DAMP_GRID"]

COMPENSATE_MODES = ("none", "bias", "obs")
DAMP_GRID = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
CV_GRID = DAMP_GRID + (3.0, 10.0, 30.0, 100.0)
DAMP_SELECT = ("gcv", "cv")


@dataclass
class LayerFit:
    """Streaming least-squares statistics of one consumer (two folds for choosing λ)."""

    kept: int
    outputs: int
    with_hessian: bool
    A: list = field(default_factory=list)    # per fold: x̃ᵀx̃ [K, K]
    B: list = field(default_factory=list)    # per fold: x̃ᵀt   [K, O]
    s: list = field(default_factory=list)    # per fold: Σ x̃   [K]
    t: list = field(default_factory=list)    # per fold: Σ t    [O]
    tt: list = field(default_factory=list)   # per fold: Σ ‖t‖²
    n: list = field(default_factory=list)    # per fold: rows

    def __post_init__(self):
        k, o = self.kept, self.outputs
        for _ in range(2):
            self.A.append(np.zeros((k, k)) if self.with_hessian else None)
            self.B.append(np.zeros((k, o)) if self.with_hessian else None)
            self.s.append(np.zeros(k))
            self.t.append(np.zeros(o))
            self.tt.append(0.0)
            self.n.append(0)

    @property
    def nbytes(self) -> int:
        per = (self.kept * self.kept + self.kept * self.outputs) if self.with_hessian else 0
        return 2 * 8 * (per + self.kept + self.outputs)

    def add(self, fold: int, xk: np.ndarray, target: np.ndarray, chunk: int = 32768) -> None:
        """xk: [rows, K] kept features of the pruned model; target: [rows, O] = W·x_orig.

        Products run in float32 over chunks of rows and are summed in float64."""
        for r0 in range(0, xk.shape[0], chunk):
            x = np.ascontiguousarray(xk[r0:r0 + chunk], dtype=np.float32)
            y = np.ascontiguousarray(target[r0:r0 + chunk], dtype=np.float32)
            if self.with_hessian:
                self.A[fold] += x.T @ x
                self.B[fold] += x.T @ y
            self.s[fold] += x.sum(0)
            self.t[fold] += y.sum(0)
            self.tt[fold] += float(np.vdot(y, y))
            self.n[fold] += x.shape[0]

    def total(self):
        A = self.A[0] + self.A[1] if self.with_hessian else None
        B = self.B[0] + self.B[1] if self.with_hessian else None
        return A, B, self.s[0] + self.s[1], self.t[0] + self.t[1], self.tt[0] + self.tt[1], self.n[0] + self.n[1]


def _aug(A, B, s, t, n):
    """Statistics of the features augmented with a constant 1 (the bias)."""
    k = A.shape[0]
    Aa = np.empty((k + 1, k + 1))
    Aa[:k, :k], Aa[:k, k], Aa[k, :k], Aa[k, k] = A, s, s, n
    Ba = np.vstack([B, t[None, :]])
    return Aa, Ba


def _error(theta, Aa, Ba, tt) -> float:
    """Σ‖t − Θᵀ[x; 1]‖² from the statistics (Θ: [K+1, O])."""
    return float(tt - 2 * np.sum(theta * Ba) + np.sum(theta * (Aa @ theta)))


class _Ridge:
    """Solutions of min ‖t − W'x − δ‖² + λ‖W' − W0‖² for many λ from one eigendecomposition.

    The bias δ is not dampened, so it is eliminated by centring: (Ac + λI) W'ᵀ = Bc + λW0ᵀ
    with Ac = A − ssᵀ/n, Bc = B − stᵀ/n, then δ = (t − W's)/n.
    """

    def __init__(self, A, B, s, t, n, theta0):
        n = max(n, 1)
        self.s, self.t, self.n = s, t, n
        Ac = A - np.outer(s, s) / n
        Bc = B - np.outer(s, t) / n
        self.evals, self.Q = np.linalg.eigh((Ac + Ac.T) / 2)
        # directions the calibration data does not excite (dead or constant channels, float32
        # noise) keep the uncompensated weights instead of fitting noise
        self.flat = self.evals <= 1e-6 * max(float(self.evals.max(initial=0.0)), 1e-300)
        self.evals = np.maximum(self.evals, 0.0)
        self.QtB = self.Q.T @ Bc
        self.QtW0 = self.Q.T @ theta0[:-1]

    def solve(self, lam: float) -> np.ndarray:
        d = self.evals + lam
        d = np.where(d > 0, d, np.inf)
        comp = (self.QtB + lam * self.QtW0) / d[:, None]
        comp[self.flat] = self.QtW0[self.flat]
        wk = self.Q @ comp
        delta = (self.t - wk.T @ self.s) / self.n
        return np.vstack([wk, delta[None, :]])


def _scale(A, n) -> float:
    """Mean feature energy per row: λ = damp · scale · rows makes `damp` relative to the data."""
    sc = float(np.mean(np.diag(A))) / max(n, 1) if A is not None and A.size else 0.0
    return sc if sc > 0 else 1.0


def _cv_damp(fit: LayerFit, theta0: np.ndarray, w_kept: np.ndarray) -> float | None:
    """λ (as a fraction of the mean feature energy) by 2-fold cross-validation over batches.

    Each fold is fitted on its own statistics for every λ in :data:`CV_GRID` and scored on
    the other fold's; ``inf`` (keep the weights, re-fit the bias) competes too. Unlike GCV,
    which treats every row as independent, the folds split whole batches, so the rows of
    one sample (a conv's output positions, a sequence's tokens) are never on both sides:
    the choice measures how the fit generalises to new samples. None when a fold is empty.
    """
    if min(fit.n) == 0:
        return None
    errs = np.zeros(len(CV_GRID) + 1)
    for f in (0, 1):
        g = 1 - f
        Av, Bv = _aug(fit.A[g], fit.B[g], fit.s[g], fit.t[g], fit.n[g])
        ridge = _Ridge(fit.A[f], fit.B[f], fit.s[f], fit.t[f], fit.n[f], theta0)
        lam0 = _scale(fit.A[f], fit.n[f]) * fit.n[f]
        for i, r in enumerate(CV_GRID):
            errs[i] += _error(ridge.solve(max(r, 1e-10) * lam0), Av, Bv, fit.tt[g])
        delta = (fit.t[f] - w_kept @ fit.s[f]) / fit.n[f]
        errs[-1] += _error(np.vstack([w_kept.T, delta[None, :]]), Av, Bv, fit.tt[g])
    i = int(np.argmin(errs))
    return np.inf if i == len(CV_GRID) else float(CV_GRID[i])


def _bias_only(A, B, s, t, tt, n, w_kept, theta0, damp) -> dict:
    delta = (t - w_kept @ s) / n
    Aa, Ba = _aug(A, B, s, t, n)
    theta = np.vstack([w_kept.T, delta[None, :]])
    return {"weight": w_kept, "delta": delta, "damp": damp, "error_before": max(_error(theta0, Aa, Ba, tt), 0.0),
            "error_after": max(_error(theta, Aa, Ba, tt), 0.0), "target_energy": tt}


def fit_layer(fit: LayerFit, w_kept: np.ndarray, mode: str, damp: float | None = None,
              select: str = "gcv") -> dict:
    """New kept weights [O, K] and bias shift [O] for one layer, with the errors before/after.

    `w_kept` is the uncompensated pruned weight matrix [O, K]. The result never has a larger
    calibration error than `w_kept` with no bias shift.
    """
    A, B, s, t, tt, n = fit.total()
    n = max(n, 1)
    theta0 = np.vstack([w_kept.T, np.zeros((1, w_kept.shape[0]))])
    if mode == "bias" or not fit.with_hessian:
        delta = (t - w_kept @ s) / n
        theta = np.vstack([w_kept.T, delta[None, :]])
        if fit.with_hessian:
            Aa, Ba = _aug(A, B, s, t, n)
            return _checked({"weight": w_kept, "delta": delta, "damp": None,
                             "error_before": _error(theta0, Aa, Ba, tt), "error_after": _error(theta, Aa, Ba, tt),
                             "target_energy": tt}, fit, w_kept, theta0, None)
        # the bias alone: the error drops by exactly n·‖δ‖²
        return _checked({"weight": w_kept, "delta": delta, "damp": None, "error_drop": n * float(delta @ delta),
                         "target_energy": tt}, fit, w_kept, theta0, None)
    Aa, Ba = _aug(A, B, s, t, n)
    scale = _scale(A, n)
    tiny = 1e-10
    ridge = _Ridge(A, B, s, t, n, theta0)
    auto = damp is None
    if damp is None and select == "cv":
        damp = _cv_damp(fit, theta0, w_kept)
        if damp == np.inf:   # held-out rows say: keep the weights, re-fit the bias only
            return _checked(_bias_only(A, B, s, t, tt, n, w_kept, theta0, "bias only (cv)"), fit, w_kept, theta0,
                            None)
    if damp is None:  # generalised cross-validation (one eigendecomposition for every λ)
        best = None
        for r in DAMP_GRID:
            lam = max(r, tiny) * scale * n
            th = ridge.solve(lam)
            live = ~ridge.flat
            dof = float(np.sum(ridge.evals[live] / (ridge.evals[live] + lam))) + 1.0
            if n - dof <= 0:
                continue
            gcv = max(_error(th, Aa, Ba, tt), 0.0) / (n - dof) ** 2
            if best is None or gcv < best[0] * (1 - 1e-9):
                best = (gcv, r)
        damp = float(best[1]) if best else 1e-2
    floor = damp_floor(w_kept.shape[1], n)
    if auto and damp < floor:
        # the fewer rows per input feature, the stronger the pull toward the pruned weights; the
        # weaker choice stays only where it does better on held-out batches (an exact removal)
        if min(fit.n) == 0 or _heldout_refit_error(fit, theta0, floor) <= _heldout_refit_error(fit, theta0, damp):
            damp = floor
    theta = ridge.solve(max(damp, tiny) * scale * n)
    before, after = _error(theta0, Aa, Ba, tt), _error(theta, Aa, Ba, tt)
    if not np.all(np.isfinite(theta)) or after > before:
        # numerical trouble: fall back to the optimal bias alone (never worse)
        delta = (t - w_kept @ s) / n
        theta = np.vstack([w_kept.T, delta[None, :]])
        after = _error(theta, Aa, Ba, tt)
    res = {"weight": theta[:-1].T, "delta": theta[-1], "damp": damp, "error_before": max(before, 0.0),
           "error_after": max(after, 0.0), "target_energy": tt}
    return _checked(res, fit, w_kept, theta0, lambda f: _Ridge(fit.A[f], fit.B[f], fit.s[f], fit.t[f], fit.n[f],
                                                               theta0).solve(max(damp, tiny) * _scale(fit.A[f], fit.n[f])
                                                                             * fit.n[f]))


# rows per input feature under which the dampening gets a floor: damp >= DAMP_FLOOR * K / rows
DAMP_FLOOR = 0.1


def damp_floor(inputs: int, rows: int) -> float:
    """The least automatic dampening for a layer of `inputs` kept features fitted on `rows` rows:
    proportional to the inputs-to-rows ratio (at most 1), so a fit with few rows per weight is
    held near the pruned weights while a well-determined one is not."""
    return min(1.0, DAMP_FLOOR * inputs / max(rows, 1))


def _heldout_refit_error(fit: LayerFit, theta0, damp: float) -> float:
    """Error on each fold of the re-fit (at `damp`) on the other fold, summed."""
    err = 0.0
    for f in (0, 1):
        th = _Ridge(fit.A[f], fit.B[f], fit.s[f], fit.t[f], fit.n[f], theta0).solve(
            max(damp, 1e-10) * _scale(fit.A[f], fit.n[f]) * fit.n[f])
        err += _fold_error(th, fit, 1 - f) if np.all(np.isfinite(th)) else np.inf
    return err


def _fold_error(theta, fit: LayerFit, g: int) -> float:
    Aa, Ba = _aug(fit.A[g], fit.B[g], fit.s[g], fit.t[g], fit.n[g])
    return _error(theta, Aa, Ba, fit.tt[g])


def _checked(res: dict, fit: LayerFit, w_kept, theta0, refit) -> dict:
    """Keep a re-fit only if it helps on samples it was not fitted on: each fold's fit (`refit(f)`,
    the same method on fold f's statistics alone) is scored on the other fold against the pruned
    weights (and, for a weight re-fit, against the bias-only re-fit). A re-fit that does not
    lower the held-out error falls back to the bias alone, or to the pruned weights unchanged.
    With one fold empty (a single calibration batch) there is nothing to check on: kept as is."""
    res["heldout_check"] = "one calibration batch: not checked"
    if min(fit.n) == 0:
        return res
    err0 = err_fit = err_bias = 0.0
    for f in (0, 1):
        g = 1 - f
        delta = (fit.t[f] - w_kept @ fit.s[f]) / fit.n[f]
        bias_theta = np.vstack([w_kept.T, delta[None, :]])
        if fit.with_hessian:
            err0 += _fold_error(theta0, fit, g)
            err_bias += _fold_error(bias_theta, fit, g)
            th = refit(f) if refit is not None else bias_theta
            err_fit += _fold_error(th, fit, g) if np.all(np.isfinite(th)) else np.inf
        else:  # the bias alone: ‖r − δ‖² summed over fold g's rows, r the uncompensated residual
            r = fit.t[g] - w_kept @ fit.s[g]
            err_bias += -2.0 * float(delta @ r) + fit.n[g] * float(delta @ delta)
    if not fit.with_hessian:
        err_fit = err_bias
    res["heldout_error_pruned"], res["heldout_error_refit"] = float(err0), float(err_fit)
    weights_changed = not np.array_equal(res["weight"], w_kept)
    if weights_changed and err_fit < min(err0, err_bias):
        res["heldout_check"] = "weights and bias re-fitted"
    elif err_bias < err0:
        A, B, s, t, tt, n = fit.total()
        delta = (t - w_kept @ s) / n
        res.update(weight=w_kept, delta=delta, heldout_check="bias only (the weight re-fit did not help on held-out "
                   "batches)" if weights_changed else "bias re-fitted")
        if fit.with_hessian and "error_after" in res:
            Aa, Ba = _aug(A, B, s, t, n)
            res["error_after"] = max(_error(np.vstack([w_kept.T, delta[None, :]]), Aa, Ba, tt), 0.0)
    else:
        res.update(weight=w_kept, delta=np.zeros(w_kept.shape[0]),
                   heldout_check="kept the pruned weights (no re-fit helped on held-out batches)")
        if "error_after" in res:
            res["error_after"] = res["error_before"]
        if "error_drop" in res:
            res["error_drop"] = 0.0
    return res


# --------------------------------------------------------------------------- graph edits


def _add_bias(graph: gs.Graph, node: gs.Node, view: ContractionView, delta: np.ndarray, dtype) -> str:
    """Add `delta` (per output) to the node's bias input (as its op rule's weight layout names it),
    creating one if needed, else to a following Add with a constant, else to a new Add; returns where."""
    delta = np.asarray(delta, np.float64)
    rule = rule_for(node)
    lay = rule.weight_layout(node) if rule is not None else None
    if lay is not None and lay.bias is not None:
        beta = float(node.attrs.get(lay.bias_scale_attr, 1.0)) if lay.bias_scale_attr else 1.0
        if len(node.inputs) > lay.bias and node.inputs[lay.bias].name:
            c = node.inputs[lay.bias]
            if isinstance(c, gs.Constant) and beta != 0:
                c.values = (np.asarray(c.values, np.float64) + delta / beta).astype(c.values.dtype)
                return "bias"
        else:
            if beta == 0:
                node.attrs[lay.bias_scale_attr] = 1.0
                beta = 1.0
            while len(node.inputs) < lay.bias:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(gs.Constant(f"{node.name or node.outputs[0].name}_gp_bias",
                                           (delta / beta).astype(dtype)))
            return "new bias"
    # no bias input (MatMul), or one that is not a constant: a following Add with a constant, else a new Add
    y = node.outputs[0]
    users = list(y.outputs)
    if len(users) == 1 and users[0].op == "Add":
        add = users[0]
        other = [t for t in add.inputs if t is not y]
        if len(other) == 1 and isinstance(other[0], gs.Constant):
            c = other[0]
            shape = tuple(c.shape)
            n_out = delta.shape[0]
            if shape and shape[-1] == n_out and int(np.prod(shape)) == n_out and len(c.outputs) == 1:
                v = np.asarray(c.values, np.float64)
                c.values = (v + delta.reshape(shape)).astype(c.values.dtype)
                return "following Add"
    inner = gs.Variable(f"{y.name}_gp_nobias", dtype=y.dtype, shape=y.shape)
    node.outputs[0] = inner
    bias = gs.Constant(f"{node.name or y.name}_gp_bias", delta.astype(dtype))
    graph.nodes.append(gs.Node("Add", name=f"{node.name or y.name}_gp_bias_add", inputs=[inner, bias], outputs=[y]))
    return "new Add"


# --------------------------------------------------------------------------- the pass


def _reference_model(ctx: PruneContext) -> Model:
    """The normalized, unpruned model (same tensor names as the pruned one)."""
    from .normalize import NormalizePass

    ref = PruneContext(model=ctx.original.copy(), original=ctx.original, registry=ctx.registry,
                       options=dict(ctx.options))
    NormalizePass()(ref)
    return ref.model


def _ancestors(graph: gs.Graph, consumers: list[str]) -> dict[str, int]:
    """Bitmask of the consumer nodes upstream of each consumer node."""
    bit = {name: 1 << i for i, name in enumerate(consumers)}
    anc_of_tensor: dict[str, int] = {}
    out = {}
    for node in graph.nodes:
        mask = 0
        for t in node.inputs:
            mask |= anc_of_tensor.get(t.name, 0)
        if node.name in bit:
            out[node.name] = mask
            mask |= bit[node.name]
        for t in node.outputs:
            anc_of_tensor[t.name] = mask
    return out


def _residual_partner(graph: gs.Graph, view: ContractionView, kept: dict):
    """(name, channel axis, kept original channels or None) of the other addend when the
    consumer's output goes straight into a two-input Add with an activation (a residual sum).

    Re-fitting the consumer toward ``y_orig + s_orig − s_pruned`` makes the *sum* match the
    original: the layer also absorbs the error that the skip path brings from upstream. The
    other addend must lie upstream of the consumer (it is final when the consumer is fitted).
    """
    nodes = {n.name: n for n in graph.nodes}
    node = nodes.get(view.node)
    if node is None or not node.outputs:
        return None
    y = node.outputs[0]
    users = list(y.outputs)
    if len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2:
        return None
    other = [t for t in users[0].inputs if t is not y]
    if len(other) != 1 or isinstance(other[0], gs.Constant) or other[0].name in {o.name for o in graph.outputs}:
        return None
    s = other[0]
    ys, ss = tensor_shape(y), tensor_shape(s)
    if ys is None or ss is None or len(ys) != len(ss) or len(ys) < 2:
        return None
    # the other addend must be upstream of the consumer's input (so every layer that changes
    # it was fitted in an earlier wave; a parallel branch would correct the same error twice)
    seen, stack = set(), [t for t in node.inputs if not isinstance(t, gs.Constant)]
    while stack:
        t = stack.pop()
        if t.name == s.name:
            break
        for prod in t.inputs:
            if id(prod) not in seen:
                seen.add(id(prod))
                stack.extend(prod.inputs)
    else:
        return None
    axis = view.y_axis % len(ss)
    return s.name, axis, kept.get((s.name, axis))


class CompensatePass(Pass):
    """`compensate` option: none | bias | obs (see the module docstring)."""

    name = "compensate"

    def call(self, ctx: PruneContext) -> PassResult:
        mode = ctx.option("compensate", "none") or "none"
        if mode == "none" or ctx.plan is None:
            return PassResult()
        if mode not in COMPENSATE_MODES:
            from graphprune.errors import BadInputError

            raise BadInputError(f"compensate must be one of {', '.join(COMPENSATE_MODES)}, got {mode!r}")
        from graphprune.calibration import context_calibration

        calib = context_calibration(ctx, purpose=f"--compensate {mode}")
        dg = ctx.dependency
        labels = ctx.plan.removed_labels(ctx.groups)
        kept = kept_indices(dg, labels)
        keys = []
        for dim in dg.removed_elements(labels):
            d = dg.dim_index[dim]
            if dg.dim_role.get(d) == ROLE_REDUCE and dg.dim_is_weight[d]:
                keys.append((dim.tensor, dim.axis))
        report = {"mode": mode, "data": calib.describe(), "layers": [], "skipped": []}
        if not keys:
            ctx.report["compensation"] = report
            return PassResult(info={"layers": 0})
        ctx.options["_uncompensated_model"] = ctx.model.copy()  # for CompensationGuardPass (weights shared)
        ref = _reference_model(ctx)
        ref_views = find_views(ref, keys)
        pr_views = find_views(ctx.model, keys)
        ref_tensors, pr_tensors = ref.graph.tensors(), ctx.model.graph.tensors()
        jobs = []
        sequential = bool(ctx.option("compensate_sequential", True))
        residual = bool(ctx.option("compensate_residual", False))
        for key in keys:
            rv, pv = ref_views.get(key), pr_views.get(key)
            why = None
            if dequant_weight(ref_tensors[key[0]]):
                why = "quantized weight (integer, behind DequantizeLinear): not re-fitted"
            elif rv is None or pv is None:
                why = "no single consumer node"
            elif not rv.has_hessian or rv.kind != pv.kind or rv.x != pv.x:
                why = f"{rv.op} (group {rv.group}) is not a plain feature contraction"
            elif mode == "obs" and rv.features > 8192:
                why = f"{rv.features} input features (over 8192)"
            if why:
                report["skipped"].append({"weight": key[0], "reason": why})
                continue
            w_ref = np.asarray(ref_tensors[key[0]].values)
            for ax in range(w_ref.ndim):
                if ax != key[1] and (key[0], ax) in kept:
                    w_ref = np.take(w_ref, kept[(key[0], ax)], axis=ax)
            w_pr = np.asarray(pr_tensors[key[0]].values)
            keep_el = kept.get(key, np.arange(w_ref.shape[key[1]]))
            jobs.append({"key": key, "ref": rv, "pr": pv, "w_ref": rv.weight_matrix(w_ref.astype(np.float64)),
                         "w_ref32": np.ascontiguousarray(rv.weight_matrix(w_ref.astype(np.float64)), np.float32),
                         "w_pr": pv.weight_matrix(w_pr.astype(np.float64)), "dtype": w_pr.dtype,
                         "kept_features": rv.element_features(keep_el)})
            if residual and sequential:
                jobs[-1]["skip"] = _residual_partner(ctx.model.graph, pv, kept)
        order = {n.name: i for i, n in enumerate(ctx.model.graph.nodes)}
        jobs.sort(key=lambda j: order.get(j["pr"].node, 0))
        anc = _ancestors(ctx.model.graph, [j["pr"].node for j in jobs])
        bit = {j["pr"].node: 1 << i for i, j in enumerate(jobs)}
        budget = int(ctx.option("stats_memory", 1 << 30) or (1 << 30))
        waves, cur, cur_mask, cur_bytes = [], [], 0, 0
        for j in jobs:
            k, o = j["w_pr"].shape[1], j["w_pr"].shape[0]
            b = 16 * (k * k + k * o + k + o) if mode == "obs" else 16 * (k + o)
            if cur and ((sequential and anc.get(j["pr"].node, 0) & cur_mask) or cur_bytes + b > budget):
                waves.append(cur)
                cur, cur_mask, cur_bytes = [], 0, 0
            cur.append(j)
            cur_mask |= bit[j["pr"].node]
            cur_bytes += b
        if cur:
            waves.append(cur)
        ref_proto = ref.to_proto()
        damp = ctx.option("compensate_damp")
        bar = ctx.progress.bar(len(jobs), f"compensate ({mode})")
        peak = 0
        cut_budget = budget if ctx.option("compensate_resume", True) else -1
        runners = (SegmentRunner(calib.batches(), cut_budget), SegmentRunner(calib.batches(), cut_budget))
        ref_index = {n.name: i for i, n in enumerate(ref.graph.nodes)}
        for w, wave in enumerate(waves):
            nxt = waves[w + 1] if w + 1 < len(waves) else None
            peak = max(peak, self._run_wave(ctx, wave, nxt, ref_proto, ref_index, runners, mode, damp, report,
                                            sequential))
            bar.update(len(wave))
        bar.close()
        ctx.model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        ctx.model = Model.from_proto(ctx.model.to_proto(infer=False, materialize_data=False), ctx.model.meta)
        after = model_cost(ctx.model)
        ctx.report["params_after"] = int(after.params)
        if ctx.report.get("params_before"):
            ctx.report["params_ratio"] = after.params / ctx.report["params_before"]
        report.update({"waves": len(waves), "sequential": sequential, "peak_stats_bytes": peak})
        ctx.report["compensation"] = report
        return PassResult(modified=bool(report["layers"]), info={"layers": len(report["layers"]),
                                                                 "waves": len(waves)})

    def _run_wave(self, ctx, wave, nxt, ref_proto, ref_index, runners, mode, damp, report, sequential) -> int:
        select = ctx.option("compensate_select", "gcv") or "gcv"
        names = sorted({j["ref"].x for j in wave} | {j["skip"][0] for j in wave if j.get("skip")})
        fits = {}
        for j in wave:
            fits[j["key"]] = LayerFit(j["w_pr"].shape[1], j["w_pr"].shape[0], mode == "obs")
        # the next run resumes at this wave's first layer: everything before it is final
        pr_index = {n.name: i for i, n in enumerate(ctx.model.graph.nodes)}
        ref_next = min(ref_index.get(j["ref"].node, 0) for j in wave) if nxt else None
        pr_next = min(pr_index.get(j["pr"].node, 0) for j in wave) if nxt else None
        ref_run = runners[0].run(ref_proto, names, ref_next)
        if sequential:
            pr_run = runners[1].run(ctx.model.to_proto(), names, pr_next)
        else:
            pr_run = iter(lambda: None, 0)   # the kept features of the original stand in
        for b, (rv, pv) in enumerate(zip(ref_run, pr_run)):
            fold = b % 2
            for j in wave:
                xr = j["ref"].feature_rows(rv[j["ref"].x])
                xp = j["pr"].feature_rows(pv[j["pr"].x]) if sequential else xr[:, j["kept_features"]]
                if xr.shape[0] != xp.shape[0]:
                    raise AssertionError(f"{j['key'][0]}: {xr.shape[0]} rows in the original, {xp.shape[0]} pruned")
                target = np.asarray(xr, np.float32) @ j["w_ref32"].T
                if j.get("skip"):   # also undo the error the other addend carries
                    name, axis, keep = j["skip"]
                    sr, sp = rv[name], pv[name]
                    if keep is not None:
                        sr = np.take(sr, keep, axis=axis)
                    if sr.shape == sp.shape and sp.ndim and sp.shape[axis] == target.shape[1]:
                        diff = np.moveaxis(sr, axis, -1).reshape(-1, target.shape[1]) \
                            - np.moveaxis(sp, axis, -1).reshape(-1, target.shape[1])
                        if diff.shape[0] == target.shape[0]:
                            target = target + diff.astype(np.float32)
                fits[j["key"]].add(fold, xp, target)
        held = sum(f.nbytes for f in fits.values())
        graph = ctx.model.graph
        nodes = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        for j in wave:
            fit = fits.pop(j["key"])
            res = fit_layer(fit, j["w_pr"], mode, damp, select)
            w_t = tensors[j["key"][0]]
            if not np.any(res["delta"]) and res["weight"] is j["w_pr"]:
                entry = {"node": j["pr"].node, "weight": j["key"][0], "damp": res["damp"],
                         "kept_inputs": int(j["w_pr"].shape[1]), "unchanged": True,
                         "heldout_check": res["heldout_check"]}
                if "error_before" in res and res["target_energy"] > 0:
                    entry["rel_err_before"] = entry["rel_err_after"] = float(
                        np.sqrt(res["error_before"] / res["target_energy"]))
                report["layers"].append(entry)
                continue
            if mode == "obs":
                w_t.values = j["pr"].from_weight_matrix(res["weight"], np.asarray(w_t.values))
                w_t.data_location = None
            where = _add_bias(graph, nodes[j["pr"].node], j["pr"], res["delta"], j["dtype"])
            entry = {k: res[k] for k in ("heldout_error_pruned", "heldout_error_refit") if k in res}
            entry |= {"node": j["pr"].node, "weight": j["key"][0], "kept_inputs": int(j["w_pr"].shape[1]),
                     "removed_inputs": int(j["w_ref"].shape[1] - j["w_pr"].shape[1]), "bias": where,
                     "damp": res["damp"], "heldout_check": res.get("heldout_check")}
            if j.get("skip"):
                entry["residual"] = j["skip"][0]
            energy = res["target_energy"]
            if "error_before" in res and energy > 0:
                entry["rel_err_before"] = float(np.sqrt(res["error_before"] / energy))
                entry["rel_err_after"] = float(np.sqrt(res["error_after"] / energy))
            report["layers"].append(entry)
        graph.toposort()
        return held


class CompensationGuardPass(Pass):
    """After the final fidelity pass: if compensation made the model less faithful on the held-out
    calibration samples (none of which it was fitted on; see fidelity.is_worse), the uncompensated
    model is written instead. ``report["compensation"]["kept"]`` says which, and why."""

    name = "compensation-guard"

    def call(self, ctx: PruneContext) -> PassResult:
        saved = ctx.options.pop("_uncompensated_model", None)
        comp = ctx.report.get("compensation")
        if saved is None or comp is None:
            return PassResult()
        from graphprune.fidelity import is_worse

        fid = ctx.report.get("fidelity", {})
        before, after = fid.get("before_compensation"), fid.get("after_compensation")
        if before is None or after is None:
            comp["kept"], comp["kept_why"] = "compensated", "not checked (no held-out fidelity measured)"
            return PassResult()
        worse = is_worse(after, before)
        if worse is None:
            comp["kept"], comp["kept_why"] = "compensated", "held-out fidelity not lower"
            return PassResult()
        ctx.model = saved
        comp["kept"], comp["kept_why"] = "uncompensated", f"compensation lowered held-out fidelity ({worse})"
        fid["final"] = "before_compensation"
        after_cost = model_cost(ctx.model)
        ctx.report["params_after"] = int(after_cost.params)
        if ctx.report.get("params_before"):
            ctx.report["params_ratio"] = after_cost.params / ctx.report["params_before"]
        return PassResult(modified=True, info={"kept": "uncompensated"})
