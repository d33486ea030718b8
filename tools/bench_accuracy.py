"""Accuracy without fine-tuning: graphprune's criteria and compensation against Torch-Pruning
and onnxsim's ONNX pruning on two real pretrained models, at equal MACs.

    python tools/bench_accuracy.py --out bench_out [--models lite0 minilm] [--targets 0.7 0.5]
    python tools/bench_accuracy.py --out bench_out --write-md BENCHMARKS.md   # table only

EfficientNet-Lite0: top-1 agreement with the original on held-out crops (photos never used for
calibration). all-MiniLM-L6-v2: sentence-embedding cosine with the original on held-out
sentences. MACs are counted by graphprune's cost model on every result (ONNX), so all
methods are compared by the same count. Each result is cached in OUT/results.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphprune  # noqa: E402
from graphprune.calibration import CalibrationData  # noqa: E402
from graphprune.fidelity import measure_fidelity  # noqa: E402

CRITERIA = ["l1", "l2", "random", "bn-scale", "wanda", "flap", "obs", "obs-free"]
START, END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"


def macs_of(model) -> float:
    return float(graphprune.analyze(model).cost.macs)


# --------------------------------------------------------------------------- data


# Held-out photos (evaluation only, never calibration); every other photo of the pool calibrates.
HELDOUT_PHOTOS = ("chelsea", "rocket", "immunohistochemistry", "coins", "clock", "grass", "text", "flower",
                  "grace_hopper")
LITE0_EVAL_CROPS = 256
LITE0_CALIB_CROPS = 64


def photo_pool() -> dict[str, np.ndarray]:
    """Every photo that ships inside the installed packages (no download), RGB uint8.

    scikit-image: astronaut, chelsea, coffee, rocket, motorcycle_left/right (a stereo pair, one
    scene), hubble_deep_field, immunohistochemistry, retina, and the grayscale camera, coins,
    moon, clock, brick, grass, gravel, cell, page, text (as RGB); scikit-learn: china, flower;
    matplotlib: grace_hopper. (skimage's ``cat`` is ``chelsea`` again, so it is left out.)
    """
    import os

    import skimage.data as d
    import skimage.io
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
                 "hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "moon", "clock",
                 "brick", "grass", "gravel", "cell", "page", "text"):
        if name.startswith("motorcycle"):   # shipped, but only reachable through stereo_motorcycle()
            a = skimage.io.imread(os.path.join(os.path.dirname(d.__file__), name + ".png"))
        else:
            a = np.asarray(getattr(d, name)())
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.dtype != np.uint8:
            a = (255 * (a.astype(np.float64) / max(float(a.max()), 1e-9))).astype(np.uint8)
        out[name] = np.ascontiguousarray(a[..., :3])
    for name, img in zip(("china", "flower"), load_sample_images().images):
        out[name] = np.asarray(img)[..., :3]
    import matplotlib.cbook as cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        out["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    return out


def photo_crops(names, n: int, seed: int, size: int = 224) -> np.ndarray:
    """`n` crops cycling over the photos `names`: random side 25-100% of the shorter side,
    random position, random horizontal flip, resized to `size`; ImageNet-normalised NCHW."""
    from models import pretrained as P

    pool = photo_pool()
    return P.random_crops([pool[k] for k in names], n, np.random.default_rng(seed), size)


def lite0_data(samples: int = LITE0_CALIB_CROPS, heldout: int = LITE0_EVAL_CROPS) -> CalibrationData:
    names = sorted(photo_pool())
    cal_names = [n for n in names if n not in HELDOUT_PHOTOS]
    cal = photo_crops(cal_names, samples, seed=0)
    held = photo_crops(list(HELDOUT_PHOTOS), heldout, seed=1000)
    return CalibrationData([{"input": cal[i:i + 8]} for i in range(0, len(cal), 8)],
                           [{"input": held[i:i + 8]} for i in range(0, len(held), 8)],
                           source=f"{samples} crops of {len(cal_names)} photos")


def load_setup(name: str, out: Path, samples: int) -> dict:
    from models import pretrained as P

    if name == "lite0":
        path = out / "efficientnet_lite0.onnx"
        if not path.exists():
            P.export_efficientnet_lite0(path)
        calib = lite0_data(samples)
        metric = "top1_agreement"
    else:
        path = out / "minilm_l6.onnx"
        if not path.exists():
            P.export_minilm(path)
        sents = P.minilm_sentences(samples + 128)
        calib = CalibrationData(P.minilm_batches(sents[:samples]), P.minilm_batches(sents[samples:]),
                                source=f"{samples} template-grammar sentences")
        metric = "cosine"
    ref = graphprune.fidelity._collect(__import__("onnx").load(str(path)), calib.heldout)
    return {"name": name, "path": str(path), "calib": calib, "metric": metric, "ref": ref,
            "macs": macs_of(str(path)), "sentences": sents[:samples] if name == "minilm" else None}


def score(setup: dict, proto) -> dict:
    m = measure_fidelity(setup["ref"], proto, setup["calib"].heldout)
    return {"cosine": m["cosine"], "rel_err": m["rel_err"], "top1_agreement": m.get("top1_agreement"),
            "top5_agreement": m.get("top5_agreement")}


# --------------------------------------------------------------------------- graphprune


FLAGS = {"cv": {"compensate_select": "cv"}, "residual": {"compensate_residual": True}}


def _flag_label(flags, unit: str = "crops") -> str:
    named = [f for f in flags if not f.startswith("calib=")]
    crops = [f.split("=", 1)[1] for f in flags if f.startswith("calib=")]
    text = "; ".join(t for t in (", ".join(named), f"{crops[0]} calibration {unit}" if crops else "") if t)
    return f" ({text})" if text else ""


def run_graphprune(setup, target, criterion, comp, flags=()) -> dict:
    t0 = time.perf_counter()
    opts = {k: v for f in flags if f in FLAGS for k, v in FLAGS[f].items()}
    calib = setup["calib"]
    for f in flags:
        if f.startswith("calib=") and setup["name"] == "lite0":   # more calibration crops, same held-out crops
            calib = lite0_data(int(f.split("=", 1)[1]))
        if f.startswith("calib=") and setup["name"] == "minilm":
            # N of the calibration sentences; their last fifth is held out for compensation's own
            # fidelity check (the scoring sentences stay unseen)
            from models import pretrained as P

            n = int(f.split("=", 1)[1])
            sents = setup["sentences"][:n]
            k = n - max(1, n // 5)
            calib = CalibrationData(P.minilm_batches(sents[:k]), P.minilm_batches(sents[k:]),
                                    source=f"{k} template-grammar sentences ({n - k} held out)")
            opts["fidelity"] = True
    opts.setdefault("fidelity", False)
    r = graphprune.prune(setup["path"], target_flops=target, criterion=criterion, compensate=comp,
                         calib=calib, round_to=8, **opts)
    secs = time.perf_counter() - t0
    res = score(setup, r.model)
    res.update({"macs_ratio": macs_of(r.model) / setup["macs"], "seconds": secs})
    if "kept" in r.report.get("compensation", {}):
        res["compensation_kept"] = r.report["compensation"]["kept"]
    return res


# --------------------------------------------------------------------------- Torch-Pruning


def _tp_prune(setup, ratio):
    import torch
    import torch_pruning as tp

    from models import pretrained as P

    if setup["name"] == "lite0":
        model = P.efficientnet_lite0_module()
        example = torch.zeros(1, 3, 224, 224)
        ignored = [model._fc]
        kwargs = {}
    else:
        model = P.minilm_module()
        example = (torch.ones(1, 12, dtype=torch.int64), torch.ones(1, 12, dtype=torch.int64))
        bert = model.bert
        hidden = bert.config.hidden_size
        ignored = [bert.embeddings] + [m for m in bert.modules()
                                       if isinstance(m, torch.nn.Linear) and m.out_features == hidden
                                       and m not in _qkv(bert)]
        num_heads = {lin: bert.config.num_attention_heads for lin in _qkv(bert)}
        kwargs = {"num_heads": num_heads, "prune_num_heads": True, "prune_head_dims": False,
                  "head_pruning_ratio": ratio}
    imp = tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, global_pruning=True,
                                  ignored_layers=ignored, **kwargs)
    pruner.step()
    if setup["name"] == "minilm":
        for layer in model.bert.encoder.layer:
            att = layer.attention.self
            heads = pruner.num_heads.get(att.query, att.num_attention_heads)
            att.num_attention_heads = heads
            att.all_head_size = att.query.out_features
            att.attention_head_size = att.all_head_size // max(heads, 1)
            if hasattr(att, "config"):
                pass
    return model


def _qkv(bert):
    out = []
    for layer in bert.encoder.layer:
        att = layer.attention.self
        out += [att.query, att.key, att.value]
    return out


def _export_torch(setup, model, path: Path) -> str:
    import torch

    with torch.no_grad():
        if setup["name"] == "lite0":
            torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), input_names=["input"],
                              output_names=["logits"], opset_version=17, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        else:
            ids = torch.ones(2, 12, dtype=torch.int64)
            torch.onnx.export(model, (ids, ids), str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["embedding"], opset_version=17, dynamo=False,
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                            "attention_mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}})
    return str(path)


def _search(fn, target, setup, lo=0.0, hi=0.95, steps=8):
    """Bisect a peer's pruning knob until its MACs (graphprune's count) match `target`."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        proto = fn(mid)
        ratio = macs_of(proto) / setup["macs"]
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (proto, ratio, mid)
        if abs(ratio - target) < 0.01:
            break
        if ratio > target:
            lo = mid
        else:
            hi = mid
    return best


def run_torch_pruning(setup, target, out: Path) -> dict:
    import onnx

    def fn(r):
        path = out / f"tp_{setup['name']}.onnx"
        _export_torch(setup, _tp_prune(setup, r), path)
        return onnx.load(str(path))

    t0 = time.perf_counter()
    proto, ratio, knob = _search(fn, target, setup)
    res = score(setup, proto)
    res.update({"macs_ratio": ratio, "knob": knob, "seconds": time.perf_counter() - t0})
    return res


def run_onnxsim(setup, target, method: str) -> dict:
    import onnx
    from onnxsim import pruning

    model = onnx.load(setup["path"])
    calib = [dict(b) for b in setup["calib"].calib]

    def fn(s):
        if method == "wanda":
            return pruning.apply_structured_wanda_pruning(copy.deepcopy(model), calibration_data=calib,
                                                          num_samples=len(calib), sparsity=s, global_sparsity=True)
        return pruning.apply_structured_pruning(copy.deepcopy(model), sparsity=s, global_sparsity=True)

    t0 = time.perf_counter()
    proto, ratio, knob = _search(fn, target, setup)
    res = score(setup, proto)
    res.update({"macs_ratio": ratio, "knob": knob, "seconds": time.perf_counter() - t0})
    return res


# --------------------------------------------------------------------------- table


def write_markdown(results: dict, path: Path) -> None:
    lines = [START, "## Accuracy without fine-tuning (issue 5)", "",
             f"`{results.get('command', 'python tools/bench_accuracy.py --out bench_out')}` on CPU "
             "(onnxruntime). No fine-tuning anywhere. "
             f"EfficientNet-Lite0: top-1 / top-5 agreement with the unpruned model (top-5: the original's class "
             f"among the pruned model's five highest) on {LITE0_EVAL_CROPS} random crops (25-100% of the shorter "
             f"side, random flips) of {len(HELDOUT_PHOTOS)} held-out photos ({', '.join(HELDOUT_PHOTOS)}) that are "
             f"never used for calibration; calibration: {LITE0_CALIB_CROPS} crops of the other 13 photos that "
             "scikit-image, scikit-learn and matplotlib ship (`photo_pool()`; a strict photo-level split). "
             "all-MiniLM-L6-v2: mean cosine of the sentence embeddings (mean pooling + L2 norm, in the graph) with "
             "the unpruned model's on 128 held-out sentences (calibration: 96 other sentences). MACs are counted "
             "by graphprune's cost model for every method, so peers are compared at the same MACs (their knob is "
             "bisected to within 0.01). `--compensate obs` is sequential least-squares re-fitting of every "
             "consumer of removed channels; `bias` re-fits the bias only (FLAP).", ""]
    for model, metric in (("lite0", "top-1 / top-5 agreement"), ("minilm", "embedding cosine")):
        rows = results.get(model, {})
        if not rows:
            continue
        title = "EfficientNet-Lite0" if model == "lite0" else "all-MiniLM-L6-v2"
        targets = sorted({k.split("|")[0] for k in rows}, reverse=True)
        lines += [f"### {title}: {metric}", "", "| method | " + " | ".join(
            f"{metric} @ {t} (MACs)" for t in targets) + " |", "|---|" + "---|" * len(targets)]
        methods = []
        for k in rows:
            m = k.split("|", 1)[1]
            if m not in methods:
                methods.append(m)
        key = "top1_agreement" if model == "lite0" else "cosine"
        for m in methods:
            cells = []
            for t in targets:
                r = rows.get(f"{t}|{m}")
                if r is None:
                    cells.append("–")
                elif "error" in r:
                    cells.append(f"failed: {r['error'][:80]}")
                else:
                    v = r.get(key)
                    v5 = r.get("top5_agreement") if model == "lite0" else None
                    txt = "–" if v is None else f"{v:.3f}" + (f" / {v5:.3f}" if v5 is not None else "")
                    cells.append(f"{txt} ({r['macs_ratio']:.3f})" if v is not None else "–")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    notes = results.get("notes", [])
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines.append(END)
    block = "\n".join(lines)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--models", nargs="+", default=["lite0", "minilm"], choices=["lite0", "minilm"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5])
    p.add_argument("--criteria", nargs="*", default=CRITERIA, help="criteria run with every --compensate mode "
                   "(none: only the --extra settings)")
    p.add_argument("--compensate", nargs="+", default=["none", "obs"])
    p.add_argument("--peers", nargs="*", default=["torch-pruning", "onnxsim-magnitude", "onnxsim-wanda"])
    p.add_argument("--extra", nargs="*", default=["flap+bias", "obs+obs:cv,residual",
                                                  "obs+obs:cv,residual,calib=256"],
                   help="criterion+compensate pairs, optionally :flag,flag (flags: cv = --compensate-select cv, "
                        "residual = --compensate-residual, calib=N = N calibration crops for Lite0 instead of "
                        f"{LITE0_CALIB_CROPS})")
    p.add_argument("--write-md", metavar="BENCHMARKS.md")
    p.add_argument("--only-md", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}

    def save():
        store.write_text(json.dumps(results, indent=1))

    if not args.only_md:
        results["command"] = "python tools/bench_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
        for model in args.models:
            setup = load_setup(model, out, LITE0_CALIB_CROPS if model == "lite0" else 96)
            rows = results.setdefault(model, {})
            runs = [(c, k, ()) for c in args.criteria for k in args.compensate]
            for e in args.extra:   # criterion+compensate[:flag,flag]
                ck, _, fl = e.partition(":")
                runs.append((*ck.split("+"), tuple(f for f in fl.split(",") if f)))
            runs.sort(key=lambda r: not (r[:2] == ("obs", "obs") and r[2]))   # the headline setting first
            for target in args.targets:
                jobs = [(f"graphprune {c}" + ("" if k == "none" else f" + {k}") + _flag_label(f, "crops" if model == "lite0" else "sentences"),
                         lambda c=c, k=k, f=f: run_graphprune(setup, target, c, k, f)) for c, k, f in runs]
                for peer in args.peers[::-1]:
                    if peer == "torch-pruning":
                        jobs.insert(1, ("Torch-Pruning MagnitudeImportance",
                                     lambda: run_torch_pruning(setup, target, out)))
                    elif peer.startswith("onnxsim"):
                        meth = peer.split("-", 1)[1]
                        label = ("onnxsim apply_structured_wanda_pruning" if meth == "wanda"
                                 else "onnxsim apply_structured_pruning (magnitude)")
                        jobs.insert(1, (label, lambda meth=meth: run_onnxsim(setup, target, meth)))
                for label, fn in jobs:
                    key = f"{target}|{label}"
                    if key in rows:
                        continue
                    try:
                        rows[key] = fn()
                    except Exception as exc:  # a peer that cannot handle the model: record why
                        rows[key] = {"error": f"{type(exc).__name__}: {exc}".replace("\n", " ")}
                        traceback.print_exc()
                    print(model, key, rows[key], flush=True)
                    save()
    if args.write_md:
        write_markdown(results, Path(args.write_md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
