"""Recover: distil the pruned graph against the original on the calibration inputs (``--recover``).

No labels and no training code: the original model is the teacher. The pruned ONNX graph runs in
PyTorch through :mod:`graphprune.torch_exec` (every float weight of a Conv/Gemm/MatMul/norm/bias a
parameter named by its initializer), is trained to reproduce the original's outputs on augmented
calibration inputs, and the trained values are written back into the same ONNX graph. The
held-out calibration samples are never trained on: they decide early stopping (the best held-out
state is kept, and the state before training counts, so recovery never leaves the model less
faithful on them than it found it). Before training the torch twin must agree with onnxruntime,
and after write-back onnxruntime must agree with the trained twin before the model is kept.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from graphprune.errors import BadInputError
from graphprune.pipeline import Pass, PassResult, PruneContext

from .recover_match import anchor_tensors, infer_kept_channels, plan_kept_channels, select_kept

__all__ = ["RecoverPass", "TWIN_TOLERANCE", "augment_images", "augment_tokens"]

TWIN_TOLERANCE = 1e-3        # max relative error between onnxruntime and the torch twin
_PATIENCE = 12               # evaluations without a held-out gain before stopping early
def _is_image(v: np.ndarray) -> bool:
    return v.dtype.kind == "f" and v.ndim == 4 and min(v.shape[2:]) >= 8


def augment_images(torch, x, rng: np.random.Generator):
    """Random resized crops (8-100% of the area, aspect 3/4..4/3) resized back, and flips, per
    sample of an NCHW float batch; then mixup of random pairs for half the samples."""
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        area = h * w * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch = int(round(min(h, max(4, math.sqrt(area / aspect)))))
        cw = int(round(min(w, max(4, math.sqrt(area * aspect)))))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        crop = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        if rng.random() < 0.5:
            crop = crop.flip(3)
        out.append(crop)
    y = torch.cat(out, 0)
    if n > 1:
        lam = torch.from_numpy(rng.beta(0.4, 0.4, size=(n, 1, 1, 1)).astype(np.float32))
        use = torch.from_numpy((rng.random((n, 1, 1, 1)) < 0.5).astype(np.float32))
        lam = use * lam + (1 - use)
        y = lam * y + (1 - lam) * y[torch.from_numpy(rng.permutation(n))]
    return y


def augment_tokens(feeds: dict, rng: np.random.Generator, drop: float = 0.15, swap: float = 0.1) -> dict:
    """Token dropping and local shuffling for token batches: every 2-D integer input of shape
    [batch, seq] (ids, attention mask, token types) gets the same position edit, so the mask stays
    consistent. The first position (a CLS/BOS token in most tokenizers) is always kept."""
    seq_inputs = {k: v for k, v in feeds.items() if v.ndim == 2 and v.dtype.kind in "iu"}
    if not seq_inputs:
        return feeds
    s = next(iter(seq_inputs.values())).shape[1]
    if s < 3 or any(v.shape[1] != s for v in seq_inputs.values()):
        return feeds
    keep = [0] + [j for j in range(1, s) if rng.random() >= drop]
    order = list(keep)
    for j in range(1, len(order) - 1):
        if rng.random() < swap:
            order[j], order[j + 1] = order[j + 1], order[j]
    out = dict(feeds)
    for k, v in seq_inputs.items():
        out[k] = np.ascontiguousarray(v[:, order])
    return out


class _Pool:
    """Calibration samples to draw minibatches from: one array per input when every batch has the
    same per-sample shape (images, padded tokens), else the batches as they are."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        shapes = {tuple((k, np.shape(v)[1:]) for k, v in sorted(b.items())) for b in batches}
        self.arrays = None
        if len(shapes) == 1:
            self.arrays = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}
            self.n = len(next(iter(self.arrays.values())))

    def draw(self, rng: np.random.Generator, size: int) -> dict:
        if self.arrays is None:
            return dict(self.batches[int(rng.integers(len(self.batches)))])
        idx = rng.choice(self.n, size=min(size, self.n), replace=False)
        return {k: v[idx] for k, v in self.arrays.items()}


def _score(ref: dict, got: dict, kinds: dict) -> float:
    """Held-out objective: mean over outputs of cosine, averaged with top-1 agreement for class
    scores (top-1 alone moves in steps of 1/samples on a small held-out part)."""
    vals = []
    for name, ys in ref.items():
        if name not in got:
            continue
        y = np.concatenate([np.asarray(a, np.float64).reshape(len(a), -1) for a in ys])
        yh = np.concatenate([np.asarray(a, np.float64).reshape(len(a), -1) for a in got[name]])
        if y.shape != yh.shape:
            continue
        cos = float(np.mean((y * yh).sum(1) / np.maximum(np.linalg.norm(y, axis=1) * np.linalg.norm(yh, axis=1),
                                                          1e-30)))
        if kinds.get(name) == "class scores" and y.shape[1] > 1:
            vals.append(0.5 * float((y.argmax(1) == yh.argmax(1)).mean()) + 0.5 * cos)
        else:
            vals.append(cos)
    return float(np.mean(vals)) if vals else 0.0


def _kept_channels(ctx, torch, teacher, student, batch: dict, anchors: list[str]) -> tuple[dict, list[str]]:
    """Kept channels of the anchors (from the plan, else inferred from one batch of activations)
    and the anchors that can be matched: same shape as the student's tensor at the kept channels."""
    if not anchors:
        return {}, []
    t_vals = dict(zip(anchors, teacher.run(anchors, batch)))
    with torch.no_grad():
        s_vals = {k: v.cpu().numpy() for k, v in student.run(batch, extra=anchors).items() if k in anchors}
    kept = plan_kept_channels(ctx, t_vals)
    rest = {k: v for k, v in t_vals.items() if k not in kept}
    kept.update(infer_kept_channels(rest, s_vals))
    usable = []
    for a in anchors:
        t = t_vals[a]
        for axis, idx in kept.get(a, ()):
            t = np.take(t, idx, axis=axis)
        if a in s_vals and np.shape(t) == s_vals[a].shape:
            usable.append(a)
    return kept, usable


class RecoverPass(Pass):
    """Runs when the ``recover`` option is set; see the module docstring."""

    name = "recover"

    def call(self, ctx: PruneContext) -> PassResult:
        if not ctx.option("recover", False):
            return PassResult()
        from graphprune.calibration import context_calibration
        from graphprune.fidelity import measure_fidelity, output_kind, reference_outputs
        from graphprune.runtime import session
        from graphprune.torch_exec import TorchGraph, _torch

        torch = _torch()
        calib = context_calibration(ctx, purpose="--recover")
        if not calib.calib or not calib.heldout:
            raise BadInputError("--recover needs calibration samples and held-out samples (give --calib with "
                                "at least 2 samples)")
        threads = os.cpu_count() or 1
        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        proto = ctx.model.to_proto()
        student = TorchGraph(proto, device=device)
        if not student.trainable:
            raise BadInputError("--recover: the pruned graph has no float weights to train")
        original_proto = ctx.original.to_proto()
        anchors = anchor_tensors(original_proto, proto)
        if anchors:   # the teacher also returns the intermediate targets
            import onnx

            original_proto.graph.output.extend(onnx.ValueInfoProto(name=a) for a in anchors)
        teacher = session(original_proto, threads=threads)
        pruned_sess = session(proto, threads=threads)
        t_names = [o.name for o in teacher.get_outputs() if o.name not in anchors]
        feed_names = {i.name for i in teacher.get_inputs()}
        s_out = {o.name for o in proto.graph.output}
        ref = reference_outputs(ctx, calib)
        heldout = [{k: np.asarray(v) for k, v in b.items() if k in feed_names} for b in calib.heldout]

        def twin(batch) -> dict:
            with torch.no_grad():
                out = student.run(batch)
            return {k: v.detach().cpu().numpy() for k, v in out.items()}

        def twin_error(sess) -> float:
            worst = 0.0
            for b in heldout[:2]:
                want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, b)))
                got = twin(b)
                for k, w in want.items():
                    w = np.asarray(w, np.float64)
                    den = float(np.abs(w).max()) or 1.0
                    worst = max(worst, float(np.abs(w - got[k]).max()) / den)
            return worst

        err = twin_error(pruned_sess)
        if not err <= TWIN_TOLERANCE:
            raise BadInputError(f"--recover: the PyTorch twin of the pruned graph disagrees with onnxruntime "
                                f"(max relative error {err:.2e} > {TWIN_TOLERANCE:g}); not recovering")
        kept, anchors = _kept_channels(ctx, torch, teacher, student, heldout[0], anchors)
        compare = [n for n in t_names if n in s_out]
        shapes = {o.name: tuple(d.dim_value for d in o.type.tensor_type.shape.dim) for o in proto.graph.output}
        kinds = {n: output_kind(proto, n, shapes.get(n, ()))[0] for n in compare}
        ref_cmp = {n: ref[n] for n in compare if n in ref}

        def heldout_outputs() -> dict:
            got: dict = {n: [] for n in compare}
            for b in heldout:
                out = twin(b)
                for n in compare:
                    got[n].append(out[n])
            return got

        best = _score(ref_cmp, heldout_outputs(), kinds)
        before_score = best
        best_state = student.weights()
        params = student.parameters()
        lr = float(ctx.option("recover_lr", 0.0) or 0.0) or 1e-4
        opt = torch.optim.Adam(params, lr=lr)
        pool = _Pool([{k: np.asarray(v) for k, v in b.items() if k in feed_names} for b in calib.calib])
        rng = np.random.default_rng(int(ctx.option("seed", 0) or 0))
        torch.manual_seed(int(ctx.option("seed", 0) or 0))
        batch = int(ctx.option("recover_batch", 16) or 16)
        steps_cap = ctx.option("recover_steps", None)
        minutes = float(ctx.option("recover_minutes", 5.0) or 5.0)
        budget = None if steps_cap else minutes * 60.0
        eval_every = max(1, int(ctx.option("recover_eval_every", 0) or 0)) if ctx.option("recover_eval_every") \
            else (max(1, int(steps_cap) // 20) if steps_cap else None)   # a step budget: 20 held-out checks
        t0 = time.perf_counter()
        step, evals_since_best, stop = 0, 0, "budget"
        next_eval = max(10.0, (budget or 60.0) / 20) if budget else 0.0
        history = [(0, round(best, 4))]
        bar = ctx.progress.bar(int(steps_cap) if steps_cap else int(budget), "recover")
        last_tick = t0
        while True:
            elapsed = time.perf_counter() - t0
            frac = (step / steps_cap) if steps_cap else (elapsed / budget)
            if frac >= 1.0:
                break
            for g in opt.param_groups:   # linear warm-up over the first 5%, then cosine decay to 0
                g["lr"] = lr * min(1.0, frac / 0.05) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            feeds = pool.draw(rng, batch)
            feeds = augment_tokens(feeds, rng)
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
            for k, v in tensors.items():
                if _is_image(feeds[k]):
                    tensors[k] = augment_images(torch, v, rng)
            t_all = teacher.run(compare + anchors, {k: v.numpy() for k, v in tensors.items()})
            t_out, t_mid = t_all[:len(compare)], t_all[len(compare):]
            s_all = student.run({k: v.to(device) for k, v in tensors.items()}, extra=anchors)
            loss = 0.0
            for n, t in zip(compare, t_out):
                t = torch.from_numpy(np.asarray(t)).to(device)
                s = s_all[n]
                if not t.is_floating_point() or s.shape != t.shape:
                    continue
                if kinds[n] == "class scores" and t.dim() == 2 and t.shape[1] > 1:
                    temp = 2.0
                    loss = loss + torch.nn.functional.kl_div(torch.log_softmax(s / temp, 1),
                                                             torch.softmax(t / temp, 1),
                                                             reduction="batchmean") * temp * temp
                else:
                    loss = loss + ((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)
            mid = []
            for n, t in zip(anchors, t_mid):
                s = s_all.get(n)
                t = select_kept(torch, torch.from_numpy(np.asarray(t)).to(device), kept.get(n))
                if s is not None and s.shape == t.shape and t.is_floating_point():
                    mid.append(((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12))
            if mid and isinstance(loss, torch.Tensor):
                loss = loss + sum(mid) / len(mid)
            if not isinstance(loss, torch.Tensor):
                raise BadInputError("--recover: no float output of the pruned model matches the original's shape")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            now = time.perf_counter()
            bar.update(1 if steps_cap else int(now - last_tick))
            if not steps_cap:
                last_tick = now - ((now - last_tick) % 1.0)
            due = (step % eval_every == 0) if eval_every else ((now - t0) >= next_eval)
            last = (steps_cap and step >= steps_cap) or (budget and now - t0 >= budget)
            if due or last:
                score = _score(ref_cmp, heldout_outputs(), kinds)
                history.append((step, round(score, 4)))
                bar.set_description(f"recover: held-out {score:.4f} (best {max(best, score):.4f})")
                if score > best:
                    best, best_state, evals_since_best = score, student.weights(), 0
                else:
                    evals_since_best += 1
                if not eval_every:   # the next check after a twentieth of the budget of training time
                    next_eval = (time.perf_counter() - t0) + max(10.0, (budget or 60.0) / 20)
                if evals_since_best >= _PATIENCE:
                    stop = "early stop: held-out fidelity stopped improving"
                    break
        bar.close()
        seconds = time.perf_counter() - t0
        if steps_cap and stop == "budget":
            stop = "steps"
        student.load_weights(best_state)
        kept_initial = best <= before_score
        if not kept_initial:
            tensors_by_name = ctx.model.tensors()
            for name, value in best_state.items():
                ctx.model.store(tensors_by_name[name], value)
        new_proto = ctx.model.to_proto()
        err_after = twin_error(session(new_proto, threads=threads))
        if not err_after <= TWIN_TOLERANCE:
            raise BadInputError(f"--recover: the recovered ONNX graph disagrees with its trained PyTorch twin "
                                f"(max relative error {err_after:.2e}); not saved")
        fid = ctx.report.setdefault("fidelity", {})
        before = measure_fidelity(ref, proto, heldout)
        after = measure_fidelity(ref, new_proto, heldout) if not kept_initial else before
        fid.setdefault("heldout_samples", calib.heldout_samples)
        fid.setdefault("data", "synthetic" if calib.synthetic else "held-out calibration samples")
        fid["before_recovery"] = before
        fid["after_recovery"] = after
        fid["final"] = "after_recovery"
        info = {"steps": step, "seconds": round(seconds, 1), "seconds_per_step": round(seconds / max(step, 1), 4),
                "stop": stop, "batch": batch, "lr": lr, "device": device,
                "trained_tensors": len(best_state), "matched_intermediates": len(anchors),
                "matched_at_kept_channels": sum(1 for a in anchors if a in kept), "heldout_objective_before": round(before_score, 4),
                "heldout_objective_after": round(best, 4), "kept": "initial weights (no held-out gain)"
                if kept_initial else "recovered", "twin_error": err_after, "history": history[-50:],
                "calibration_samples": calib.samples, "heldout_samples": calib.heldout_samples}
        if before is not None:
            info["fidelity_before"] = {k: v for k, v in before.items() if k != "outputs"}
        if after is not None:
            info["fidelity_after"] = {k: v for k, v in after.items() if k != "outputs"}
        ctx.report["recovery"] = info
        return PassResult(modified=not kept_initial, info={k: info[k] for k in ("steps", "seconds", "stop", "kept")})
