"""Command line: a thin layer over graphprune.prune / graphprune.analyze.

Exit codes: 0 done, 1 internal error (a bug: please report it), 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .argtypes import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, ArgParser, number_in
from .cost import format_shape
from .errors import BadInputError, GraphpruneError
from .options import ANALYZE, PRUNE, add_option_arguments, check_ratio, options_from_args
from .roles import WEIGHT_ROLES

__all__ = ["main", "build_parser"]

_EPILOG = """\
exit codes: 0 done, 1 internal error, 2 bad input (missing/corrupt file, bad flag, unreachable target).
examples:
  graphprune model.onnx --target-flops 0.5 -o model.pruned.onnx
  graphprune model.onnx --target-params 0.6 --criterion l2 --report report.json
  graphprune model.onnx --target-flops 0.5 --calib calib.npz --criterion obs --compensate obs
  graphprune model.onnx --target-flops 0.5 --calib images/ --calib-preprocess imagenet size=224
  graphprune analyze model.onnx
  graphprune plan model.onnx --target-flops 0.5 -o plan.json
"""


_Parser = ArgParser  # one-line errors, exit 2 (graphprune/argtypes.py)
_ratio = number_in(check_ratio)  # --target-latency: the same check as every other fraction to keep


def build_parser() -> argparse.ArgumentParser:
    """`graphprune MODEL ...`: the prune options come from graphprune.options.PruneOptions (defined once
    there, with their defaults, checks and choices); the flags here are the command's own."""
    p = _Parser(prog="graphprune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
                description="Structured pruning of ONNX models: removes coupled channels and writes a "
                            "physically smaller ONNX graph. Subcommands: `graphprune analyze MODEL`, "
                            "`graphprune plan MODEL`.")
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", help="output path (default: <stem>.pruned.onnx beside the input)")
    add_option_arguments(p, PRUNE)
    p.add_argument("--report", metavar="JSON", help="write the report (MACs, params, groups, removed channels)")
    p.add_argument("--plan", metavar="JSON",
                   help="write the pruning plan in the input's tensor names (docs/plan.md)")
    lat = p.add_argument_group("latency (onnxruntime CPU/CUDA, TensorRT, PyTorch CUDA)")
    lat.add_argument("--target-latency", type=_ratio, metavar="R",
                     help="prune until the measured latency on --backend is at most R x the original's (searches "
                          "the FLOPs target; per-layer latency table cached in ~/.cache/graphprune/latency)")
    lat.add_argument("--bench", action="store_true", help="time the original and the pruned model side by side")
    lat.add_argument("--report-html", metavar="PATH",
                     help="write a self-contained HTML report: summary, per-layer widths and latency plots, table")
    from .bench import add_bench_options

    add_bench_options(lat)  # --backend --runs --warmup --threads --batch --seq --shape --fp16
    p.add_argument("--no-deploy-folder", action="store_true",
                   help="a model in an onnxruntime-genai (genai_config.json) or Hugging Face (config.json) folder: "
                        "do not treat it as a deployment folder (default: the same heads in every layer, the KV "
                        "cache follows, the config is rewritten and tokenizer files copied beside -o)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def build_analyze_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphprune analyze", description="Show the channel groups, pinned channels and why, "
                                                      "and MACs per layer, without changing anything.")
    p.add_argument("model", help="input .onnx file")
    p.add_argument("--json", metavar="PATH", help="also write the analysis as JSON")
    p.add_argument("--top", type=int, default=30, metavar="N", help="layers to list by MACs (default: 30)")
    add_option_arguments(p, ANALYZE)  # --gqa-uniform --head-dim --prune-hidden --prune-kv-cache
    return p


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _write_json(path: "str | Path", data: dict, flag: str = "") -> None:
    from .paths import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default), flag)


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _run_prune(args) -> int:
    from .api import prune

    if args.target_flops is None and args.target_params is None and args.target_latency is None \
            and args.drop_branches is None:
        raise BadInputError("give --target-flops R, --target-params R or --target-latency R (the fraction to keep, "
                            "in (0, 1]) or --drop-branches N")
    if args.target_latency is not None and (args.target_flops is not None or args.target_params is not None):
        raise BadInputError("--target-latency chooses the FLOPs target itself; drop --target-flops/--target-params")
    from .paths import check_input, check_outputs, input_identities

    src = check_input(args.model)  # a regular file (no FIFO, device, directory, link loop)
    from .deploy import check_output, default_output, detect_folder

    folder = None if args.no_deploy_folder else detect_folder(str(src))
    given = args.output is not None  # `-o ""` is an empty name (refused), not the default
    out = args.output if given else str(src.with_name(f"{src.stem}.pruned.onnx"))
    if folder is not None:
        out = args.output if given else default_output(folder, str(src))
        check_output(folder, str(out))
    verify_inputs = getattr(args, "verify_inputs", None)
    for flag, given in (("--calib", args.calib), ("--verify-inputs", verify_inputs)):
        if given is not None and not (flag == "--calib" and Path(given).is_dir()):  # a folder of images is fine
            check_input(given, flag)
    # every output checked against the inputs and each other before anything is read or written
    inputs = input_identities(src, args.calib, verify_inputs)
    targets = check_outputs([("-o", out), ("--report", args.report), ("--report-html", args.report_html),
                             ("--plan", getattr(args, "plan", None))], inputs)
    out = Path(out)
    if args.calib_preprocess and not args.calib:
        raise BadInputError("--calib-preprocess needs --calib (a folder of images)")
    progress = not args.quiet and sys.stderr.isatty()
    common = options_from_args(args, PRUNE) | {"progress": progress}
    from .bench import shapes_from_args

    common["shape"] = shapes_from_args(args) or None  # --shape: the latency inputs and the MACs count
    del common["target_flops"], common["target_params"]
    if folder is not None:  # the folder's runtime: same heads in every layer, the cache follows
        policy = folder.policy
        common["prune_kv_cache"] = common["prune_kv_cache"] or policy.pop("prune_kv_cache", False)
        common["policy"] = (common.get("policy") or {}) | policy
    if args.target_latency is not None:
        from .bench import bench_kwargs
        from .latency import prune_to_latency

        log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
        result = prune_to_latency(str(src), args.target_latency, log=log, **bench_kwargs(args), **common)
    else:
        result = prune(str(src), target_flops=args.target_flops, target_params=args.target_params, **common)
    if folder is not None:
        from .deploy import check_uniform

        check_uniform(result.model)  # before anything is written
    model_path = targets["-o"].path  # a symbolic link to a regular file is written through
    try:
        result.save(model_path)
    except OSError as exc:
        raise BadInputError(f"cannot write {out}: {exc.strerror or exc}") from None
    r = result.report
    written: list = []
    try:  # what follows the model: a failure takes the model and reports back out (no half-done run is left)
        _after_save(args, r, result, src, out, folder, targets, written)
    except BaseException:
        from .paths import remove_written_model

        remove_written_model(model_path)
        for f in written:
            Path(f).unlink(missing_ok=True)
        raise
    if not args.quiet:
        pruned = sum(1 for g in r["groups"] if g["removed"])
        at = format_shape(r.get("cost_shape", {}))
        print(f"MACs    {_fmt(r['macs_before'])} -> {_fmt(r['macs_after'])}  ({r['macs_ratio']:.3f})"
              + (f"  at {at}" if at else ""))
        print(f"params  {_fmt(r['params_before'])} -> {_fmt(r['params_after'])}  ({r['params_ratio']:.3f})")
        print(f"groups  {len(r['groups'])} found, {pruned} pruned; {len(r['pinned'])} weight axes pinned")
        if "depth" in r:
            dep = r["depth"]
            kinds = ", ".join(f"{b['kind']} {b['add']}" for b in dep["removed"])
            print(f"depth   {len(dep['removed'])} of {dep['branches']} residual branches removed"
                  f"{': ' + kinds if kinds else ''}")
        for h in r.get("hidden", []):
            print(f"hidden  {h['before']} -> {h['after']}  ({h['name']})")
        if "hidden" in r and not r["hidden"]:
            print(f"hidden  not pruned: {r.get('hidden_pinned', 'pinned')}")
        for w in r.get("warnings", []):
            print(f"warning: {w}")
        if r.get("kv_cache"):
            from .kv_cache import FLAG, format_cache_shapes

            kv = r["kv_cache"]
            if any(s["before"] != s["after"] for s in kv.values()):
                print("kv cache  " + "\n          ".join(format_cache_shapes(kv)))
            else:
                print(f"kv cache  {len(kv)} inputs/outputs unchanged ({FLAG} allows pruning their heads)")
        if "deploy_folder" in r:
            d = r["deploy_folder"]
            print(f"folder  {d['config']}: {d['set']}; copied {', '.join(d['copied']) or 'nothing'}")
            if d.get("note"):
                print(f"folder  {d['note']}")
        if "oracle" in r:
            import numpy as np

            o = r["oracle"]
            runs = [v for k, v in o.items() if k.startswith("batch") or k == "inputs"]
            worst = float(np.max([v["max_rel"] for v in runs]))  # numpy's max keeps a NaN (Python's drops it)
            noise = [v["noise_floor"] for v in runs if "noise_floor" in v]
            floor = f"; float32 noise floor of the original {max(noise):.2e}" if noise else ""
            floor += f"; {o['quantized_activations']}" if "quantized_activations" in o else ""
            print(f"oracle  mask equivalence {'holds' if o['equivalent'] else 'FAILS'} (max rel err {worst:.2e}{floor})")
        if "fidelity" in r:
            print(_fidelity_line(r["fidelity"]))
        if "compensation" in r:
            c = r["compensation"]
            skipped = f", {len(c['skipped'])} skipped" if c["skipped"] else ""
            refit = sum(1 for e in c["layers"] if not e.get("unchanged"))
            kept = f"; kept the {c['kept']} model: {c['kept_why']}" if "kept" in c else ""
            print(f"compensate  {c['mode']}: {refit} of {len(c['layers'])} layers re-fitted in {c.get('waves', 0)} "
                  f"passes{skipped}{kept}")
        if "recovery" in r:
            print(_recovery_line(r["recovery"]))
        if "latency" in r:
            lat = r["latency"]
            print(f"latency {lat['original_ms']:.3f} -> {lat['pruned_ms']:.3f} ms  ({lat['measured_ratio']:.3f}, "
                  f"target {lat['target']}, {'met' if lat['met'] else 'NOT met'}) on {lat['backend_label']}")
        if "bench" in r:
            from .bench import format_bench

            print(format_bench(r["bench"]))
        print(f"wrote   {out}  in {r['prune_seconds']:.2f}s")
    if "oracle" in r and not r["oracle"]["equivalent"]:
        return EXIT_INTERNAL
    return EXIT_OK


def _after_save(args, r: dict, result, src: Path, out: Path, folder, targets: dict, written: list) -> None:
    """Deployment folder, bench and reports, once the model is written; every report is rendered
    before the first is written, and each file written is added to `written` (taken back on failure)."""
    if folder is not None:
        from .deploy import write_folder

        r["deploy_folder"] = write_folder(folder, str(out), result.model, r)
    if args.bench:
        from .bench import bench_from_args

        r["bench"] = bench_from_args([str(src), str(targets["-o"].path)], args)
        if r["bench"]["note"] and not args.quiet:
            print(f"graphprune: {r['bench']['note']}", file=sys.stderr)
    texts = []
    if args.report:
        texts.append(("--report", json.dumps(r | {"input": str(src), "output": str(out)}, indent=2,
                                             default=_json_default)))
    if args.report_html:
        from . import report_html

        try:
            texts.append(("--report-html", report_html.render_report_html(r, model=str(src), bench=r.get("bench"))))
        except OSError as exc:
            raise BadInputError(f"cannot write --report-html {args.report_html}: {exc.strerror or exc}") from None
    if getattr(args, "plan", None):
        from .plan import plan_from_result, plan_json

        texts.append(("--plan", plan_json(plan_from_result(result, str(src)))))
    from .paths import write_text_atomic

    for flag, text in texts:
        write_text_atomic(targets[flag].path, text, flag)
        written.append(targets[flag].path)


# the stages a fidelity report may hold, in pipeline order, and how the summary line names them
_STAGES = (("before_compensation", "uncompensated"), ("after_compensation", "compensated"), ("pruned", "pruned"),
           ("before_recovery", "before recovery"), ("after_recovery", "recovered"))


def _fidelity_line(f: dict) -> str:
    """`fidelity  N held-out samples: cosine a -> b [-> c], rel err ..., top-1 agreement ...
    (uncompensated -> compensated [-> recovered])`: every stage measured, in pipeline order."""
    stages = [(label, f[key]) for key, label in _STAGES if isinstance(f.get(key), dict)]
    if len(stages) > 2 and stages[-2][0] == "before recovery" and all(
            stages[-2][1].get(k) == stages[-3][1].get(k) for k in ("cosine", "rel_err")):
        del stages[-2]   # recovery started from the model the line already shows
    after = stages[-1][1] if stages else {}
    parts = []
    for key, label, fmt in (("cosine", "cosine", ".4f"), ("rel_err", "rel err", ".4f"),
                            ("top1_agreement", "top-1 agreement", ".3f")):
        values = [m[key] for _, m in stages if key in m]
        if key in after:
            parts.append(f"{label} " + " -> ".join(f"{v:{fmt}}" for v in values))
    src = "synthetic" if f.get("data") == "synthetic" else "held-out"
    tail = f" ({' -> '.join(label for label, _ in stages)})" if len(stages) > 1 else ""
    if f.get("final") == "before_compensation":
        tail += "; the uncompensated model was written"
    kinds = "; ".join(f"{name}: {m['kind']} ({m['why']}), judged by {m['metric']}"
                      for name, m in after.get("outputs", {}).items() if "kind" in m)
    return (f"fidelity  {f.get('heldout_samples', 0)} {src} samples: {', '.join(parts)}{tail}"
            + (f"\n          {kinds}" if kinds else ""))


def _recovery_line(rec: dict) -> str:
    """`recover  N steps in S s (x s/step, cpu), stop: why; held-out objective a -> b; kept: ...`."""
    matched = rec.get("matched_intermediates", 0)
    at_kept = rec.get("matched_at_kept_channels", 0)
    inter = f"; {matched} intermediate tensors matched ({at_kept} at kept channels)" if matched else ""
    return (f"recover  {rec['steps']} steps in {rec['seconds']:.1f}s ({rec['seconds_per_step']:.3f} s/step, "
            f"{rec.get('device', 'cpu')}), stop: {rec['stop']}; held-out objective "
            f"{rec['heldout_objective_before']:.4f} -> {rec['heldout_objective_after']:.4f}{inter}; "
            f"kept: {rec['kept']}")


def _run_analyze(argv) -> int:
    from .api import analyze

    from .paths import check_input, check_outputs, input_identities

    args = build_analyze_parser().parse_args(argv)
    src = check_input(args.model)
    targets = check_outputs([("--json", args.json)], input_identities(src))
    res = analyze(str(src), **options_from_args(args, ANALYZE))
    d = res.to_dict()
    at = format_shape(res.cost.input_shape)
    print(f"MACs {_fmt(d['macs'])}  params {_fmt(d['params'])}  groups {len(d['groups'])}"
          + (f"  (at {at})" if at else ""))
    print("\nprunable groups:")
    for g in res.groups:
        weights = [f"{m.tensor}[{m.axis}]" for m in g.members if m.is_weight and m.role in WEIGHT_ROLES]
        unit = f"{g.size:>5} heads x {g.width}" if g.kind == "heads" else f"{g.size:>5} ch"
        print(f"  #{g.id:<3} {unit}  {', '.join(weights[:4])}{' ...' if len(weights) > 4 else ''}")
    print("\npinned (never removed):")
    if not res.pinned:
        print("  none")
    for p in res.pinned:
        print(f"  {p.tensor}[{p.axis}] {p.count} ch: {p.reason}")
    from .branches import find_branches

    branches = find_branches(res.context.model)
    d["branches"] = [b.to_dict() for b in branches]
    print(f"\nresidual branches ({len(branches)}; removable whole with --depth / --drop-branches):")
    for b in branches:
        print(f"  #{b.id:<3} {b.kind:<9} {_fmt(b.macs):>9} MACs  {b.add} ({len(b.nodes)} nodes)")
    print(f"\nMACs per layer (top {args.top}):")
    for name, macs in sorted(d["macs_per_node"].items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {_fmt(macs):>9}  {name}")
    for w in d["warnings"]:
        print(f"warning: {w}")
    if args.json:
        _write_json(targets["--json"].path, d, "--json")
    return EXIT_OK


def build_plan_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphprune plan", description="Prune as `graphprune MODEL` does, but write only the plan: "
                "every removed channel, head and residual branch in the input file's tensor names (JSON, schema "
                "graphprune.plan/1; docs/plan.md). Nothing else is written.")
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", help="plan path (default: <stem>.plan.json beside the input)")
    add_option_arguments(p, PRUNE)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def _run_plan(argv) -> int:
    from .api import prune
    from .paths import check_input, check_outputs, input_identities
    from .plan import plan_from_result, plan_json

    args = build_plan_parser().parse_args(argv)
    if args.target_flops is None and args.target_params is None and args.drop_branches is None:
        raise BadInputError("give --target-flops R or --target-params R (the fraction to keep, in (0, 1]) or "
                            "--drop-branches N")
    src = check_input(args.model)
    if args.calib is not None and not Path(args.calib).is_dir():
        check_input(args.calib, "--calib")
    out = args.output if args.output is not None else str(src.with_name(f"{src.stem}.plan.json"))
    targets = check_outputs([("-o", out)], input_identities(src, args.calib), model_flag="")
    common = options_from_args(args, PRUNE) | {"progress": not args.quiet and sys.stderr.isatty()}
    del common["target_flops"], common["target_params"]
    result = prune(str(src), target_flops=args.target_flops, target_params=args.target_params, **common)
    p = plan_from_result(result, str(src))
    from .paths import write_text_atomic

    write_text_atomic(targets["-o"].path, plan_json(p), "-o")
    if not args.quiet:
        n = sum(len(g["tensors"]) for g in p["groups"])
        print(f"plan    {len(p['groups'])} groups pruned ({n} initializer slices), {len(p['branches'])} residual "
              f"branches removed, {len(p['graph_changes'])} other graph changes")
        for note in p["notes"]:
            print(f"note: {note}")
        print(f"wrote   {out}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "analyze":
            return _run_analyze(argv[1:])
        if argv and argv[0] == "plan":
            return _run_plan(argv[1:])
        if argv and argv[0] == "bench":
            from .bench import main as bench_main  # latency side by side (graphprune/bench.py)

            return bench_main(argv[1:])
        args = build_parser().parse_args(argv)
        # --recover-minutes/-steps/-batch/-lr tune --recover; alone they would be silently ignored
        tuning = sorted({a.split("=", 1)[0] for a in argv if a.startswith("--recover-")})
        if tuning and not args.recover:
            raise BadInputError(f"{', '.join(tuning)} tunes --recover: add --recover (or drop {tuning[0]})")
        return _run_prune(args)
    except BadInputError as exc:
        print(f"graphprune: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GraphpruneError as exc:
        print(f"graphprune: internal error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except MemoryError:
        print("graphprune: error: out of memory (the model needs more memory than is free)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("graphprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line unless asked for the traceback
        if os.environ.get("GRAPHPRUNE_DEBUG"):
            raise
        print(f"graphprune: internal error: {type(exc).__name__}: {exc} (set GRAPHPRUNE_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
