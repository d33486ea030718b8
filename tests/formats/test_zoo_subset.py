"""A fast subset of the zoo benchmark (tools/bench_zoo.py), runnable without torchvision.

The full benchmark needs the benchmark environment (torchvision, transformers, the peers);
see tools/README.md. Here: the zoo's lazy imports, one example CNN and one shipped non-PyTorch
ONNX model (Caffe2, from the onnx package) through the same per-model function the benchmark
runs, the subprocess isolation, the target search and the BENCHMARKS.md section writer.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_zoo", ROOT / "tools" / "bench_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def test_zoo_import_is_lazy_and_lists_every_family():
    code = ("import sys, models.zoo as z; "
            "assert 'torchvision' not in sys.modules and 'transformers' not in sys.modules; "
            "import json; print(json.dumps([[e.name, e.exporter, e.family] for e in z.zoo_entries()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    entries = json.loads(out.stdout)
    pairs = {(n, e) for n, e, _ in entries}
    for name in ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
                 "densenet121", "convnext_tiny", "squeezenet1_1", "shufflenet_v2_x1_0", "vit_b_16", "swin_t",
                 "hf_bert", "hf_gpt2", "hf_llama_gqa", "hf_vit", "minilm_l6", "efficientnet_lite0"):
        assert (name, "torchscript") in pairs and (name, "dynamo") in pairs, name
    producers = {e for _, e, fam in entries if fam == "onnx-package"}
    assert len(producers) >= 2 and not producers & {"torchscript", "dynamo"}
    from models.zoo import zoo_entry

    name, exporter, builder = zoo_entry("resnet18", "dynamo")  # entries unpack as (name, exporter, builder)
    assert (name, exporter) == ("resnet18", "dynamo") and callable(builder)


def _check_columns(row: dict) -> None:
    assert set(bench.COLUMNS) <= set(row)
    assert isinstance(row["success"], bool)
    if not row["success"]:
        assert row["reason"] and "\n" not in row["reason"]


def test_graphprune_row_on_example_cnn(tmp_path):
    from models.export import build_onnx

    path = build_onnx("resnet_basic", False, tmp_path)
    row = bench.bench_graphprune(path, 0.5, model="resnet_basic", exporter="torchscript", runs=20)
    _check_columns(row)
    assert row["success"], row["reason"]
    assert row["oracle_equivalent"] is True and row["oracle_max_rel"] <= 1e-4
    assert 0.48 <= row["macs_ratio"] <= 0.5 and 0 < row["params_ratio"] < 1
    assert row["prune_s"] > 0 and row["peak_mem_mb"] > 0
    assert 0 <= row["fidelity_rel_err"] and -1 <= row["fidelity_cosine"] <= 1 + 1e-9
    assert row["latency_ratio"] > 0 and row["notes"]["latency_runs"] >= 20


def test_shipped_caffe2_model_row(tmp_path):
    from models.zoo import build_zoo_model

    path = build_zoo_model("caffe2_squeezenet", "onnx-caffe2", tmp_path)
    model = onnx.load(path)
    assert model.producer_name == "onnx-caffe2"
    assert not [n for n in model.graph.node if n.op_type == "ConstantOfShape"]  # weights materialised
    row = bench.bench_graphprune(path, 0.5, model="caffe2_squeezenet", exporter="onnx-caffe2", runs=20)
    _check_columns(row)
    if row["success"]:
        assert row["oracle_equivalent"] is True
        assert row["macs_ratio"] <= 0.5
    else:  # graphprune cannot prune it yet: the benchmark records why
        assert "analyze" in row["reason"] or row["reason"]


def test_peer_rows_record_a_reason_when_unavailable(tmp_path):
    from models.export import build_onnx

    path = build_onnx("flatten_head", False, tmp_path)
    row = bench.bench_onnxsim(path, 0.5, model="flatten_head", exporter="torchscript", runs=20)
    _check_columns(row)
    if importlib.util.find_spec("onnxsim") is None:
        assert not row["success"] and "onnxsim" in row["reason"]
    if importlib.util.find_spec("torch_pruning") is None:
        rows = bench.bench_torch_pruning("resnet18", ["torchscript"], 0.5)
        assert len(rows) == 1 and not rows[0]["success"] and "torch_pruning" in rows[0]["reason"]


def test_isolated_worker_records_timeouts_and_failures(tmp_path):
    task = {"kind": "build", "model": "no_such_model", "exporter": "dynamo", "target_flops": 0.5, "threads": 1,
            "runs": 20, "latency": False}
    out = bench.run_isolated(task, 60, tmp_path)
    assert out["ok"] is False and "no_such_model" in out["reason"]
    out = bench.run_isolated(task, 0.01, tmp_path)
    assert out["ok"] is False and out["reason"].startswith("timeout after")


def test_search_lands_in_the_target_window():
    calls = []

    def kept(x):  # MACs fall roughly quadratically with the pruning ratio, in steps
        calls.append(x)
        return round((1 - x) ** 2, 3)

    x, v, trace = bench.search(kept, 0.5, 0.0, 0.9, guess=0.25)
    assert 0.48 <= v <= 0.5 and len(trace) == len(calls) <= 10
    x, v, _ = bench.search(lambda s: 0.9, 0.5, 0.0, 0.95)  # unreachable: report the strongest setting
    assert v == 0.9 and x == 0.95


def test_markdown_section_is_replaced_in_place(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Other\n\nkeep me\n")
    result = {"target_flops": 0.5, "command": "python tools/bench_zoo.py --models x", "started": "now",
              "total_s": 60.0, "threads": 2, "runs": 20, "machine": {"cpu": "cpu", "usable_cpus": 2, "ram_gib": 1},
              "versions": {"onnx": onnx.__version__}, "builds": [],
              "rows": [dict(bench.empty_row("m", "torchscript", "graphprune"), reason="boom")]}
    bench.write_markdown(md, bench.markdown_section(result))
    bench.write_markdown(md, bench.markdown_section(result))
    text = md.read_text()
    assert text.count("## Model zoo at --target-flops 0.5") == 1 and "keep me" in text
    assert "| m | torchscript | graphprune | **no** |" in text and "- m (torchscript): boom" in text
    saved = tmp_path / "zoo.json"  # --from-json re-renders an earlier run without running anything
    saved.write_text(json.dumps(dict(result, rows=[dict(result["rows"][0], reason="changed")])))
    assert bench.main(["--from-json", str(saved), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "- m (torchscript): changed" in text and "boom" not in text and "keep me" in text
