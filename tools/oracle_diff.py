"""Find the first tensor where a pruned model departs from the mask-equivalent original.

    python tools/oracle_diff.py MODEL --target-flops 0.5 [--round-to 1] [--gqa-uniform]

Runs graphprune, builds the masked original, runs both with every intermediate tensor
exposed, and compares each tensor the two share (the masked one restricted to the kept
channels) in topological order. A development tool for op-rule bugs.
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx

import graphprune
from graphprune.runtime import session, synthetic_inputs
from graphprune.verify import masked_model
from graphprune.passes.rewrite import kept_indices


def _all_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for o in node.output:
            if o and o not in names:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                names.add(o)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--gqa-uniform", action="store_true")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    res = graphprune.prune(args.model, target_flops=args.target_flops, round_to=args.round_to,
                           gqa_uniform=args.gqa_uniform)
    ctx = res.context
    labels = ctx.plan.removed_labels(ctx.groups)
    kept = kept_indices(ctx.dependency, labels)
    masked = masked_model(ctx.original, ctx.dependency, labels)
    feeds = synthetic_inputs(masked, batch=args.batch)
    a_names = [o.name for o in _all_outputs(masked).graph.output]
    a = dict(zip(a_names, session(_all_outputs(masked)).run(None, feeds)))
    b_model = _all_outputs(res.model)
    b = dict(zip([o.name for o in b_model.graph.output], session(b_model).run(None, feeds)))
    order = [o for n in masked.graph.node for o in n.output]
    for name in order:
        if name not in a or name not in b:
            continue
        x = np.asarray(a[name])
        for (t, axis), idx in kept.items():
            if t == name:
                x = np.take(x, idx, axis=axis)
        y = np.asarray(b[name])
        if x.shape != y.shape:
            print(f"SHAPE {name}: masked-kept {x.shape} vs pruned {y.shape}")
            continue
        if x.dtype.kind in "fc":
            err = float(np.abs(x - y).max(initial=0)) / (float(np.abs(x).max(initial=0)) + 1e-12)
            if err > 1e-4:
                node = next(n for n in masked.graph.node if name in n.output)
                print(f"DIFF {name} (op {node.op_type} {node.name}): rel err {err:.2e}")
                return
        elif not np.array_equal(x, y):
            print(f"DIFF {name}: integer values differ {x.ravel()[:8]} vs {y.ravel()[:8]}")
    print("no difference found")


if __name__ == "__main__":
    main()
