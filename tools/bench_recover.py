"""Recovery (``--recover``) on the two pretrained models of tools/bench_accuracy.py.

    python tools/bench_recover.py --out bench_out --model lite0 --target 0.5 --minutes 15
    python tools/bench_recover.py --out bench_out --model minilm --target 0.5 --minutes 10

Same held-out evaluation data as tools/bench_accuracy.py (EfficientNet-Lite0: 256 crops of 9
photos never used for calibration; all-MiniLM-L6-v2: 128 sentences never used). The calibration
data is split once more: recovery trains on the first part and stops early on the last part
(crops of the *calibration* photos / calibration sentences), so the evaluation data is never
seen by pruning, compensation or recovery. Each run appends one JSON row to OUT/recover.json
with fidelity without and with recovery (the same pruned, compensated model), steps and time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import graphprune  # noqa: E402
import graphprune.api  # noqa: E402
import graphprune.pipeline  # noqa: E402
from graphprune.calibration import CalibrationData  # noqa: E402

import bench_accuracy as A  # noqa: E402


def calibration(setup: dict, samples: int, valid: int, eval_photos: bool = False) -> CalibrationData:
    """Training part + recovery's own held-out part, both from the calibration side of the split.
    ``eval_photos`` (diagnostic only): crops of the 9 *evaluation* photos instead (other random crops
    than the evaluation's), an upper bound on what more relevant images could give."""
    if setup["name"] == "lite0":
        names = [n for n in sorted(A.photo_pool()) if (n in A.HELDOUT_PHOTOS) == eval_photos]
        train = A.photo_crops(names, samples, seed=0)
        val = A.photo_crops(names, valid, seed=500)
        return CalibrationData([{"input": train[i:i + 8]} for i in range(0, len(train), 8)],
                               [{"input": val[i:i + 8]} for i in range(0, len(val), 8)],
                               source=f"{samples} + {valid} crops of {len(names)} calibration photos")
    from models import pretrained as P

    sents = setup["sentences"][:samples + valid]
    return CalibrationData(P.minilm_batches(sents[:samples]), P.minilm_batches(sents[samples:]),
                           source=f"{samples} + {valid} template-grammar sentences")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", choices=("lite0", "minilm"), required=True)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--criterion", default="obs")
    ap.add_argument("--compensate", default="obs")
    ap.add_argument("--calib", type=int, default=None, help="training samples (default: 64 crops / 80 sentences)")
    ap.add_argument("--valid", type=int, default=None, help="recovery's held-out samples (default 32 / 16)")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--steps", type=int, default=None, help="train exactly this many steps (compare settings at "
                                                               "equal steps; --minutes is then ignored)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--patience", type=int, default=None,
                    help="held-out checks without a gain before recovery stops early (default: the pass's own)")
    ap.add_argument("--no-anchors", action="store_true",
                    help="match the outputs only (no intermediate tensors): isolates what the anchors add")
    ap.add_argument("--train-on-eval-photos", action="store_true",
                    help="DIAGNOSTIC, Lite0 only: train on other crops of the 9 evaluation photos (an upper bound "
                         "for more relevant calibration images; the row is marked and is not a result)")
    ap.add_argument("--pruned", type=Path, help="recover this already pruned (and compensated) model, e.g. the "
                                                "OUT/<model>_<target>_<criterion>_<compensate>.onnx an earlier run saved")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lite = args.model == "lite0"
    samples = args.calib or (64 if lite else 80)
    valid = args.valid or (32 if lite else 16)
    setup = A.load_setup(args.model, args.out, 96 if not lite else A.LITE0_CALIB_CROPS)
    if not lite and samples + valid > 96:
        from models import pretrained as P

        setup["sentences"] = P.minilm_sentences(samples + valid + 128)[:samples + valid]
        # the 128 evaluation sentences stay the ones load_setup measured against
    if args.train_on_eval_photos and not lite:
        ap.error("--train-on-eval-photos is for --model lite0")
    calib = calibration(setup, samples, valid, eval_photos=args.train_on_eval_photos)
    import graphprune.passes.recover as recover_pass   # the module the pipeline runs (not passes.recover)

    if args.no_anchors:
        recover_pass.anchor_tensors = lambda *a, **k: []
    if args.patience:
        recover_pass._PATIENCE = args.patience
    opts = {"compensate_select": "cv", "compensate_residual": True} if args.compensate == "obs" else {}
    if args.lr:
        opts["recover_lr"] = args.lr
    if args.steps:
        opts["recover_steps"] = args.steps
    snap = {}

    class Snapshot(graphprune.pipeline.Pass):   # the pruned, compensated model just before recovery
        name = "snapshot"

        def call(self, ctx):
            snap["model"] = ctx.model.to_proto()
            import onnx

            onnx.save(snap["model"], str(args.out / f"{args.model}_{args.target}_{args.criterion}_{args.compensate}.onnx"))
            return graphprune.pipeline.PassResult()

    pipe = graphprune.api.default_pipeline()
    pipe.insert_before("recover", Snapshot())
    t0 = time.perf_counter()
    if args.pruned:
        import onnx

        snap["model"] = onnx.load(str(args.pruned))
        r = graphprune.recover(setup["path"], args.pruned, calib=calib, recover_minutes=args.minutes, progress=True,
                               **{k: v for k, v in opts.items() if k.startswith("recover")})
    else:
        r = graphprune.prune(setup["path"], target_flops=args.target, criterion=args.criterion,
                             compensate=args.compensate, calib=calib, round_to=8, recover=True,
                             recover_minutes=args.minutes, progress=True, pipeline=pipe, **opts)
    total = time.perf_counter() - t0
    rec = r.report["recovery"]
    import onnx

    train_ref = graphprune.fidelity._collect(onnx.load(setup["path"]), calib.calib)

    def fit(proto):   # the same metrics on the samples recovery trained on: over-fitting vs time
        m = A.measure_fidelity(train_ref, proto, calib.calib)
        return {k: m.get(k) for k in ("cosine", "rel_err", "top1_agreement", "top5_agreement")}
    row = {"model": args.model, "target": args.target, "criterion": args.criterion, "compensate": args.compensate,
           "calib": samples, "valid": valid, "minutes": None if args.steps else args.minutes, "lr": rec["lr"],
           "macs_ratio": A.macs_of(r.model) / setup["macs"],
           "without": A.score(setup, snap["model"]), "with": A.score(setup, r.model),
           "train_fit": {"without": fit(snap["model"]), "with": fit(r.model)},
           "diagnostic": "trained on crops of the evaluation photos" if args.train_on_eval_photos else None,
           "patience": args.patience, "anchors": not args.no_anchors,
           "steps": rec["steps"], "recover_seconds": rec["seconds"], "seconds_per_step": rec["seconds_per_step"],
           "stop": rec["stop"], "kept": rec["kept"], "matched_intermediates": rec.get("matched_intermediates"),
           "matched_at_kept_channels": rec.get("matched_at_kept_channels"),
           "heldout_objective": [rec.get("heldout_objective_before"), rec.get("heldout_objective_after")], "total_seconds": total,
           "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(row, indent=1))
    path = args.out / "recover.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(row)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
