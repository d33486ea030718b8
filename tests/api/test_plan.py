"""`graphprune plan`: the plan names the input file's tensors, agrees with the pruned model's
shapes, and applied to the torch module it came from gives the pruned ONNX model's outputs."""
from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphprune
from graphprune.cli import main
from graphprune.plan import SCHEMA, PlanError, apply_plan_to_torch, load_plan, plan_from_result

HEAD_DIM = 8


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.gconv = nn.Conv2d(32, 32, 1, groups=4)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.gconv(self.dw(torch.relu(self.bn2(self.conv2(x)))))
        return self.fc(x.mean((2, 3)))


class Attention(nn.Module):
    """Heads read from the weights' shape (so a sliced module runs with fewer heads)."""

    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(hidden, heads * HEAD_DIM) for _ in range(3))
        self.o = nn.Linear(heads * HEAD_DIM, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 64), nn.Linear(64, hidden)

    def forward(self, x):
        b, s, _ = x.shape
        sh = lambda t: t.view(b, s, -1, HEAD_DIM).transpose(1, 2)  # noqa: E731
        q, k, v = sh(self.q(x)), sh(self.k(x)), sh(self.v(x))
        p = torch.softmax(q @ k.transpose(2, 3) / HEAD_DIM ** 0.5, dim=-1)
        y = self.ln(x + self.o((p @ v).transpose(1, 2).reshape(b, s, -1)))
        return y + self.fc2(torch.relu(self.fc1(y)))


def _model(cls):
    torch.manual_seed(0)
    m = cls().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.normal_()
            mod.bias.data.normal_()
    return m


def _export(m, x, path: Path, exporter: str) -> Path:
    """dynamo: optimize=False, torchscript: do_constant_folding=False keep BatchNorm and the parameter
    names; the *-default exporters fold BatchNorm (dynamo keeps the conv's name, TorchScript renames)."""
    kw = {"dynamo": exporter.startswith("dynamo"), "input_names": ["x"], "output_names": ["y"]}
    if exporter == "dynamo":
        kw["optimize"] = False
    elif exporter == "torchscript":
        kw["do_constant_folding"] = False
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(m, (x,), str(path), **kw)
    return path


def check_plan_names_and_shapes(original: Path, p: dict, pruned: onnx.ModelProto) -> int:
    """Every name in the plan is in the original file; original shape minus removed == pruned shape
    for every initializer both files hold; returns the number of initializer slices checked."""
    orig = onnx.load(str(original))
    inits = {t.name: list(t.dims) for t in orig.graph.initializer}
    nodes = {n.name for n in orig.graph.node}
    tensors = {x for n in orig.graph.node for x in (*n.input, *n.output)}
    after = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert p["schema"] == SCHEMA
    removed: dict[str, dict[int, list]] = {}
    folded = []
    for g in p["groups"]:
        assert g["size_before"] - len(g["removed"]) == g["size_after"] > 0
        assert set(g["nodes"]) <= nodes
        assert g["tensors"], g["name"]
        for t in g["tensors"]:
            if t["source"] == "initializer":
                assert t["initializer"] in inits, t
                assert t["shape"] == inits[t["initializer"]]
                assert max(t["removed"]) < t["shape"][t["axis"]]
                if "pruned_tensor" in t:  # a copy or a folded Transpose of the initializer was sliced
                    folded.append(t)
                else:
                    removed.setdefault(t["initializer"], {})[t["axis"]] = t["removed"]
            else:
                assert t["tensor"] in tensors, t
            # a head's units span unit_width rows on a weight that carries the heads
            assert len(t["removed"]) % len(g["removed"]) == 0
    for b in p["branches"]:
        assert b["add"] in nodes and set(b["nodes"]) <= nodes
        for name in b["initializers"]:
            assert name in inits and name not in after
    for c in p["graph_changes"]:
        assert c["node"] in nodes
    checked = 0
    for name, shape in inits.items():
        if name not in after:
            continue
        want = list(shape)
        for axis, rm in removed.get(name, {}).items():
            want[axis] -= len(rm)
            checked += 1
        assert after[name] == want, (name, shape, after[name])
    assert checked == sum(len(v) for v in removed.values())  # every sliced initializer is in the pruned file
    for t in folded:  # the pruned file holds the sliced copy: its axis lost exactly the removed rows
        axis = t["pruned_axis"]
        perm = next((v["perm"] for v in t.get("via", []) if v["op"] == "Transpose"), None)
        size = t["shape"][t["axis"]]
        assert perm is None or perm[axis] == t["axis"]
        assert after[t["pruned_tensor"]][axis] == size - len(t["removed"]), t["pruned_tensor"]
        checked += 1
    return checked


def _ort(proto_or_path, feeds):
    s = ort.InferenceSession(proto_or_path if isinstance(proto_or_path, str) else proto_or_path.SerializeToString(),
                             providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


CASES = {"conv": (ConvNet, (1, 3, 8, 8)), "attention": (Attention, (1, 5, 32))}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_in_torch(tmp_path, case, exporter):
    cls, shape = CASES[case]
    m = _model(cls)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    path = _export(m, x, tmp_path / "m.onnx", exporter)
    result = graphprune.prune(str(path), target_flops=0.6)
    p = plan_from_result(result, str(path))
    assert check_plan_names_and_shapes(path, p, result.model) >= 4
    if case == "attention":
        heads = [g for g in p["groups"] if g["kind"] == "heads"]
        assert heads and heads[0]["unit_width"] == HEAD_DIM
        # heads expanded to their rows on every weight that carries them
        q = next(t for t in heads[0]["tensors"] if t.get("initializer") == "q.weight")
        assert len(q["removed"]) == HEAD_DIM * len(heads[0]["removed"])
    apply_plan_to_torch(m, p, example_inputs=(x,))
    with torch.no_grad():
        got = m(x).numpy()
    want = _ort(result.model, {"x": x.numpy()})
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(want, _ort(str(path), {"x": x.numpy()}), atol=1e-3)  # the pruning changed something


def test_conv_module_attributes_follow(tmp_path):
    m = _model(ConvNet)
    x = torch.randn(1, 3, 8, 8)
    path = _export(m, x, tmp_path / "m.onnx", "dynamo")
    p = graphprune.plan(str(path), target_flops=0.6)
    apply_plan_to_torch(m, p)
    assert m.conv1.out_channels == m.bn1.num_features == m.conv2.in_channels
    assert m.conv2.out_channels == m.bn2.num_features == m.dw.in_channels == m.dw.groups == m.fc.in_features
    assert m.conv1.out_channels < 16 or m.conv2.out_channels < 32
    assert m.gconv.groups == 4
    changes = {(c["node"], c.get("attribute")) for c in p["graph_changes"]}
    if m.dw.groups < 32:  # the depthwise conv's group attribute is reported
        assert ("node_conv2d_2", "group") in changes


@pytest.mark.parametrize("exporter", ["dynamo-default", "torchscript-default"])
def test_folded_batchnorm_refused(tmp_path, exporter):
    m = _model(ConvNet)
    x = torch.randn(1, 3, 8, 8)
    path = _export(m, x, tmp_path / "m.onnx", exporter)
    p = graphprune.plan(str(path), target_flops=0.6)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(PlanError, match="folded"):
        apply_plan_to_torch(m, p)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # nothing changed
    if exporter == "torchscript-default":
        assert any("TorchScript" in n for n in p["notes"])


def test_folded_identity_batchnorm_caught_by_example_inputs(tmp_path):
    """Fresh BatchNorm (mean 0, var 1) folds into values the fingerprint cannot tell apart; running the
    sliced module on example inputs catches the BatchNorm the plan does not name, and undoes everything."""
    torch.manual_seed(0)
    m = ConvNet().eval()
    x = torch.randn(1, 3, 8, 8)
    path = _export(m, x, tmp_path / "m.onnx", "dynamo-default")
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    p = graphprune.plan(str(path), target_flops=0.6)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sizes = [(mod.in_channels, mod.out_channels) for mod in (m.conv1, m.conv2)]
    with pytest.raises(PlanError, match="example_inputs"):
        apply_plan_to_torch(m, p, example_inputs=(x,))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert [(mod.in_channels, mod.out_channels) for mod in (m.conv1, m.conv2)] == sizes
    with torch.no_grad():
        m(x)  # the module still runs as before


def test_cnn_from_models(tmp_path):
    from models.export import build_onnx

    path = Path(build_onnx("resnet_basic", True, tmp_path))
    result = graphprune.prune(str(path), target_flops=0.5)
    p = plan_from_result(result, str(path))
    assert check_plan_names_and_shapes(path, p, result.model) > 10
    names = {t["initializer"] for g in p["groups"] for t in g["tensors"] if t["source"] == "initializer"}
    assert all(n.endswith((".weight", ".bias", ".weight_bias")) for n in names), names
    # this cached export is the dynamo default: BatchNorm folded by its optimizer, and the plan says so
    if any(n.endswith(".weight_bias") for n in names):
        assert any("optimize=False" in n for n in p["notes"])


def test_transformer_heads_from_models(tmp_path):
    from models.transformer import build_transformer_onnx

    path = Path(build_transformer_onnx("bert_block", False, tmp_path))
    result = graphprune.prune(str(path), target_flops=0.6)
    p = plan_from_result(result, str(path))
    check_plan_names_and_shapes(path, p, result.model)
    heads = [g for g in p["groups"] if g["kind"] == "heads"]
    assert heads, [g["kind"] for g in p["groups"]]
    # the head count in each Reshape's run-time shape, patched at the heads axis
    kept = {g["size_after"] for g in heads}
    patched = [c for c in p["graph_changes"] if c["op"] == "Reshape"]
    assert patched and any(set(c["after"]["values"]) & kept for c in patched if isinstance(c["after"], dict))


def test_kv_groups_and_head_counts_in_a_genai_model():
    """GroupQueryAttention (com.microsoft): whole KV groups go; num_heads/kv_num_heads are reported."""
    path = Path(__file__).resolve().parents[1] / "data" / "genai" / "llama_fp32" / "model.onnx"
    result = graphprune.prune(str(path), target_flops=0.6, prune_kv_cache=True)
    p = plan_from_result(result, str(path))
    check_plan_names_and_shapes(path, p, result.model)
    kv = [g for g in p["groups"] if g["kind"] == "kv_groups"]
    assert kv
    attrs = {(c["node"], c["attribute"]): c for c in p["graph_changes"] if "attribute" in c}
    for g in kv:
        gqa = [n for n in g["nodes"] if (n, "kv_num_heads") in attrs] or [
            n for (n, a) in attrs if a == "kv_num_heads"]
        assert gqa
        c = attrs[(gqa[0], "kv_num_heads")]
        assert c["before"] * g["size_after"] == c["after"] * g["size_before"]
        q = attrs[(gqa[0], "num_heads")]
        assert q["after"] * c["before"] == q["before"] * c["after"]  # query heads per KV group unchanged


def test_depth_branches_from_models(tmp_path):
    from models.export import build_onnx

    path = Path(build_onnx("resnet_basic", True, tmp_path))
    result = graphprune.prune(str(path), drop_branches=1)
    p = plan_from_result(result, str(path))
    check_plan_names_and_shapes(path, p, result.model)
    assert len(p["branches"]) == 1 and p["branches"][0]["initializers"]
    with pytest.raises(PlanError, match="residual branches"):
        apply_plan_to_torch(nn.Module(), p)


def test_depth_and_width_from_models(tmp_path):
    from models.export import build_onnx

    path = Path(build_onnx("resnet_basic", False, tmp_path))
    result = graphprune.prune(str(path), drop_branches=1, target_flops=0.6)
    p = plan_from_result(result, str(path))
    assert len(p["branches"]) == 1 and p["groups"]
    assert check_plan_names_and_shapes(path, p, result.model) > 4
    gone = set(p["branches"][0]["nodes"])
    assert not gone & {n for g in p["groups"] for n in g["nodes"]}  # width groups live outside the branch


def test_cli_plan_and_prune_plan_agree(tmp_path):
    m = _model(ConvNet)
    path = _export(m, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", "dynamo")
    digest = path.read_bytes()
    assert main([str(path), "--target-flops", "0.6", "-q", "-o", str(tmp_path / "p.onnx"),
                 "--plan", str(tmp_path / "a.json")]) == 0
    assert main(["plan", str(path), "--target-flops", "0.6", "-q", "-o", str(tmp_path / "b.json")]) == 0
    a, b = (load_plan(tmp_path / n) for n in ("a.json", "b.json"))
    assert a["groups"] == b["groups"] and a["groups"]
    assert path.read_bytes() == digest
    check_plan_names_and_shapes(path, a, onnx.load(str(tmp_path / "p.onnx")))


def test_cli_bad_inputs_one_line_exit_2(tmp_path, capsys):
    m = _model(ConvNet)
    path = _export(m, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", "dynamo")
    out = tmp_path / "plan.json"
    out.write_text("old")
    listing = sorted(os.listdir(tmp_path))
    cases = [
        ["plan", str(path), "-o", str(out)],                                    # no target
        ["plan", str(tmp_path / "missing.onnx"), "--target-flops", "0.5", "-o", str(out)],
        ["plan", str(path), "--target-flops", "1.5", "-o", str(out)],
        ["plan", str(path), "--target-flops", "0.5", "-o", str(path)],          # the input itself
        ["plan", str(path), "--target-flops", "0.5", "-o", str(tmp_path)],      # a directory
        ["plan", str(path), "--target-flops", "0.5", "-o", ""],
        ["plan", str(path), "--target-flops", "0.5", "--no-such-flag", "-o", str(out)],
    ]
    for argv in cases:
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's own errors (one line, exit 2)
            rc = exc.code
        assert rc == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert out.read_text() == "old"  # never half-written, never replaced on failure
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary files left
    with pytest.raises(PlanError):
        load_plan(tmp_path / "m.onnx")
    json.loads(json.dumps(graphprune.plan(str(path), target_flops=0.6)))  # plain JSON types


def test_docs_plan_example_runs(tmp_path, monkeypatch):
    """docs/plan.md's Python example runs as written (export, plan, apply in torch, compare)."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "plan.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for b in blocks:
        exec(compile(b, "docs/plan.md", "exec"), ns)
    assert ns["plan"]["groups"] and ns["net"].conv1.out_channels + ns["net"].conv2.out_channels < 48
