"""Depth pruning: residual branches found, removed whole, ranked, and checked by the oracle."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphprune
from graphprune.branches import find_branches, remove_branches, zero_branches
from graphprune.cli import main
from graphprune.depth import BRANCH_CRITERIA, check_depth_equivalence, register_branch_criterion
from graphprune.graph import Model
from graphprune.runtime import run_model, synthetic_inputs

HIDDEN, FFN, HEADS = 32, 64, 4


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        sh = lambda t: t.view(b, s, HEADS, HIDDEN // HEADS).transpose(1, 2)  # noqa: E731
        q, k, v = sh(self.q(x)), sh(self.k(x)), sh(self.v(x))
        p = torch.softmax(q @ k.transpose(2, 3) / 8 ** 0.5, dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, s, HIDDEN))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, pre: bool):
        super().__init__()
        self.pre, self.attn, self.mlp = pre, Attn(), Mlp()
        self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)

    def forward(self, x):
        if self.pre:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, pre: bool, layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(Layer(pre) for _ in range(layers))
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Block(nn.Module):
    def __init__(self, c: int, stride: int = 1, out: int | None = None):
        super().__init__()
        out = out or c
        self.c1, self.b1 = nn.Conv2d(c, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out)
        self.c2, self.b2 = nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out)
        self.proj = nn.Conv2d(c, out, 1, stride, bias=False) if stride != 1 or out != c else None

    def forward(self, x):
        f = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu((self.proj(x) if self.proj is not None else x) + f)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.blocks = nn.Sequential(Block(16), Block(16), Block(16, 2, 32), Block(32), Block(32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def _zero(linear_or_bn: nn.Module) -> None:
    for p in linear_or_bn.parameters():
        p.data.zero_()
    if isinstance(linear_or_bn, nn.BatchNorm2d):
        linear_or_bn.running_mean.zero_()


def _export(model: nn.Module, shape, axes) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), torch.randn(*shape), buf, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": axes, "y": {0: "batch"}}, opset_version=17)
    return onnx.load_from_string(buf.getvalue())


def _transformer(pre: bool, planted=((1, "attn"), (2, "mlp"))) -> onnx.ModelProto:
    torch.manual_seed(0)
    enc = Encoder(pre)
    for k, part in planted:  # these sub-layers add exact zeros
        _zero(enc.layers[k].attn.o if part == "attn" else enc.layers[k].mlp.fc2)
    return _export(enc, (2, 5, HIDDEN), {0: "batch", 1: "seq"})


def _resnet(planted=(1, 4)) -> onnx.ModelProto:
    torch.manual_seed(0)
    net = ResNetish()
    for k in planted:
        _zero(net.blocks[k].b2)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and m.weight.abs().sum() > 0:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return _export(net, (1, 3, 16, 16), {0: "batch"})


@pytest.mark.parametrize("pre", [True, False])
def test_transformer_branches_found(pre):
    branches = find_branches(Model.from_proto(_transformer(pre)))
    assert len(branches) == 8  # 4 layers x (attention, MLP)
    assert [b.kind for b in branches] == ["attention", "mlp"] * 4
    names = [n for b in branches for n in b.nodes]
    assert len(names) == len(set(names))  # disjoint
    ln = [n for b in branches for n in b.nodes if "LayerNorm" in n or "ReduceMean" in n]
    assert bool(ln) == pre  # pre-norm: the norm is in f; post-norm: after the Add, not in f
    assert all(b.macs > 0 for b in branches)


def test_cnn_identity_shortcuts_only():
    branches = find_branches(Model.from_proto(_resnet()))
    assert len(branches) == 4  # the projection block (16 -> 32, stride 2) is not a branch
    assert all(b.kind == "conv" for b in branches)


@pytest.mark.parametrize("make", [lambda: _transformer(True), lambda: _transformer(False), _resnet])
def test_zero_branches_removed_exactly(make, tmp_path):
    proto = make()
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    total = sum(b.macs for b in find_branches(Model.from_proto(proto)))
    res = graphprune.prune(str(src), target_flops=0.999, drop_branches=2, branch_criterion="cosine", verify=True)
    removed = res.report["depth"]["removed"]
    assert len(removed) == 2
    assert res.report["oracle"]["equivalent"]
    onnx.checker.check_model(res.model, full_check=True)
    assert res.report["macs_after"] < res.report["macs_before"]
    assert total > 0
    dims = lambda m: [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
                      for v in list(m.graph.input) + list(m.graph.output)]
    assert dims(res.model) == dims(proto)  # dynamic axes stay dynamic
    for batch, seq in ((1, 8), (3, 11)):  # outputs unchanged: the removed branches added zeros
        feeds = synthetic_inputs(proto, batch=batch, seq=seq, seed=batch)
        a, b = run_model(proto, feeds)[0], run_model(res.model, feeds)[0]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: _transformer(True), lambda: _transformer(False), _resnet])
def test_depth_reaches_target_width_cannot(make, tmp_path):
    """Every group pinned (--protect '*' for width): only whole branches can meet the target."""
    proto = make()
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    m = Model.from_proto(proto)
    branches = find_branches(m)
    planted = sorted(branches, key=lambda b: b.macs)  # the two planted ones are found by their zero output
    shallow = remove_branches(m, [b for b in branches if _adds_zero(proto, b)])
    from graphprune.cost import model_cost

    r = model_cost(shallow).macs / model_cost(m).macs
    assert planted and r < 1
    with pytest.raises(graphprune.errors.BadInputError):
        graphprune.prune(str(src), target_flops=r + 0.01, protect=["*"])
    res = graphprune.prune(str(src), target_flops=r + 0.01, depth=True, verify=True, min_keep=1.0,
                           max_depth_fraction=0.5)
    assert {b["add"] for b in res.report["depth"]["removed"]} == {b.add for b in branches if _adds_zero(proto, b)}
    assert r + 0.01 - 0.02 <= res.report["macs_ratio"] <= r + 0.01 + 1e-9
    assert res.report["oracle"]["equivalent"]
    feeds = synthetic_inputs(proto, batch=2, seq=6, seed=3)
    np.testing.assert_allclose(run_model(res.model, feeds)[0], run_model(proto, feeds)[0], rtol=1e-5, atol=1e-5)


def _adds_zero(proto, branch) -> bool:
    from graphprune.depth import _with_outputs

    probe = _with_outputs(proto, [branch.branch_output])
    outs = run_model(probe, synthetic_inputs(proto, batch=1, seq=8, seed=0))
    return bool(np.all(outs[-1] == 0))


def test_oracle_catches_nonzero_branch_and_width_together(tmp_path):
    proto = _transformer(True, planted=())
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    # MACs at 8 tokens (at the default 128, three attention branches alone take the model below 0.6)
    res = graphprune.prune(str(src), target_flops=0.6, drop_branches=3, verify=True, shape={"x": (1, 8, 32)})
    assert res.report["oracle"]["equivalent"]  # against the original with those branches zeroed and channels masked
    assert res.report["groups"] and any(g["removed"] for g in res.report["groups"])
    assert 0.58 <= res.report["macs_ratio"] <= 0.6
    feeds = synthetic_inputs(proto, batch=1, seq=8, seed=0)
    assert not np.allclose(run_model(res.model, feeds)[0], run_model(proto, feeds)[0], atol=1e-3)
    # the oracle is not vacuous: the un-zeroed original differs from the depth-pruned model
    chosen = [b for b in find_branches(Model.from_proto(proto))
              if b.add in {r["add"] for r in res.report["depth"]["removed"]}]
    shallow = remove_branches(Model.from_proto(proto), chosen).to_proto()
    assert check_depth_equivalence(proto, shallow, chosen)["equivalent"]
    assert not check_depth_equivalence(proto, shallow, chosen[:-1])["equivalent"]


def test_protect_keeps_branch(tmp_path):
    proto = _transformer(True)
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    branches = find_branches(Model.from_proto(proto))
    zero = [b for b in branches if _adds_zero(proto, b)]
    res = graphprune.prune(str(src), drop_branches=2, protect=[zero[0].nodes[-1]], target_flops=1.0, verify=True)
    assert zero[0].add not in {r["add"] for r in res.report["depth"]["removed"]}
    assert res.report["oracle"]["equivalent"]


def test_user_branch_criterion(tmp_path):
    @register_branch_criterion("last-first")
    def last_first(model, branches, feeds):
        return [-b.id for b in branches]

    try:
        proto = _transformer(True, planted=())
        src = tmp_path / "m.onnx"
        onnx.save(proto, src)
        res = graphprune.prune(str(src), drop_branches=1, branch_criterion="last-first", target_flops=1.0)
        assert res.report["depth"]["removed"][0]["id"] == 7
    finally:
        BRANCH_CRITERIA.pop("last-first")


@pytest.mark.parametrize("criterion", ["weight-norm", "output-change", "finercut"])
def test_criteria_rank_zero_branches_first(criterion):
    proto = _transformer(True)
    from graphprune.depth import score_branches

    m = Model.from_proto(proto)
    branches = find_branches(m)
    scores = score_branches(m, branches, criterion)
    zero = {b.id for b in branches if _adds_zero(proto, b)}
    assert set(np.argsort(scores, kind="stable")[:2].tolist()) == zero


def test_kv_cache_outputs_removed(tmp_path):
    from models.kv_cache import kv_example_inputs, kv_mha, build_kv_onnx

    path = build_kv_onnx("kv_mha", dynamo=False, tmpdir=tmp_path)
    proto = onnx.load(path)
    branches = find_branches(Model.from_proto(proto))
    attn = [b for b in branches if b.kind == "attention"]
    assert len(attn) == 2 and all(b.cache_outputs for b in attn)
    shallow = remove_branches(Model.from_proto(proto), attn[:1]).to_proto()
    outs = {o.name for o in shallow.graph.output}
    assert not outs & set(attn[0].cache_outputs) and set(attn[1].cache_outputs) <= outs
    ins = {i.name for i in shallow.graph.input}
    assert not ins & set(attn[0].cache_inputs)
    onnx.checker.check_model(shallow, full_check=True)
    res = check_depth_equivalence(proto, shallow, attn[:1])
    assert res["equivalent"]
    model = kv_mha(0)
    feeds = kv_example_inputs(model, 2, 3, 4)
    got = run_model(shallow, {k: v for k, v in feeds.items() if k in ins})
    assert got[0].shape[:2] == (2, 3)


def test_cli_analyze_lists_branches(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_resnet(), src)
    assert main(["analyze", str(src)]) == 0
    out = capsys.readouterr().out
    assert "residual branches (4;" in out


def test_cli_drop_branches(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_resnet(), src)
    out = tmp_path / "o.onnx"
    assert main([str(src), "--drop-branches", "2", "--target-flops", "1", "--verify", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "depth   2 of 4 residual branches removed" in text and "holds" in text
    assert main([str(src), "--drop-branches", "9", "--target-flops", "1", "-o", str(out)]) == 2


def test_choose_branches_band_and_skip():
    from graphprune.branches import ResidualBranch
    from graphprune.depth import choose_branches

    bs = [ResidualBranch(k, f"a{k}", "x", "f", "y", macs=m) for k, m in enumerate([40.0, 10.0, 5.0, 30.0])]
    # total 100, target 0.8; score per MAC: a0 0, a1 0.1, a3 0.1, a2 0.2. a0 (40) and a3 (30) would
    # overshoot 0.78 and are skipped; a1 and a2 go (85 left), width pruning takes the rest
    got = choose_branches(bs, [0.0, 1.0, 1.0, 3.0], 100.0, target=0.8, max_fraction=1.0)
    assert [b.id for b in got] == [1, 2]
    assert [b.id for b in choose_branches(bs, [0.0, 1.0, 1.0, 3.0], 100.0, target=0.62, max_fraction=1.0)] == [0]
    assert choose_branches(bs, [0, 1, 1, 3], 100.0, target=0.8, max_fraction=0.25) == [bs[1]]
    assert [b.id for b in choose_branches(bs, [3, 2, 1, 0], 100.0, count=2, protected={3})] == [2, 1]


def test_cli_bad_depth_options(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_resnet(), src)
    for argv in (["--drop-branches", "-1"], ["--drop-branches", "1", "--branch-criterion", "nope"]):
        with pytest.raises(SystemExit) as exc:  # the parser's one-line error, exit 2
            main([str(src), *argv, "-o", str(tmp_path / "o.onnx")])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error") == 2 and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


SKIP_LN = """
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
g (float[B, T, 16] x) => (float[B, T, 4] out) <float[16, 32] w1, float[32, 16] w2, float[16, 32] w3, float[32, 16] w4,
    float[16] g1, float[16] b1, float[16] g2, float[16] b2, float[16] bias, float[16, 4] wh> {
    h1 = MatMul(x, w1)
    r1 = Relu(h1)
    f1 = MatMul(r1, w2)
    y1, m1, v1, s1 = com.microsoft.SkipLayerNormalization <epsilon: float = 1e-5> (x, f1, g1, b1, bias)
    h2 = MatMul(y1, w3)
    r2 = Relu(h2)
    f2 = MatMul(r2, w4)
    y2 = com.microsoft.SkipLayerNormalization <epsilon: float = 1e-5> (f2, y1, g2, b2)
    z = Add(y2, s1)
    out = MatMul(z, wh)
}
"""


def _skip_ln_model(zero_second: bool) -> onnx.ModelProto:
    m = onnx.parser.parse_model(SKIP_LN)
    rng = np.random.default_rng(0)
    for init in ("w1", "w2", "w3", "w4", "g1", "b1", "g2", "b2", "bias", "wh"):
        shape = {"w1": (16, 32), "w3": (16, 32), "w2": (32, 16), "w4": (32, 16), "wh": (16, 4)}.get(init, (16,))
        v = rng.standard_normal(shape).astype(np.float32)
        if init == "w4" and zero_second:
            v[:] = 0
        m.graph.initializer.append(onnx.numpy_helper.from_array(v, init))
    return m


def test_fused_skip_layernorm_branches(tmp_path):
    """Fused residual (com.microsoft SkipLayerNormalization, either operand order, with bias and the
    sum output): the branch is found and removing it leaves a LayerNormalization of x (+ bias)."""
    proto = _skip_ln_model(zero_second=True)
    branches = find_branches(Model.from_proto(proto))
    assert [b.add for b in branches] and len(branches) == 2
    for chosen in ([branches[0]], [branches[1]], branches):
        shallow = remove_branches(Model.from_proto(proto), chosen).to_proto()
        onnx.checker.check_model(shallow, full_check=True)
        assert not any(n.op_type == "MatMul" and n.input[1] in {"w1", "w2"} for n in shallow.graph.node) \
            or branches[0] not in chosen
        assert check_depth_equivalence(proto, shallow, chosen)["equivalent"]
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    res = graphprune.prune(str(src), drop_branches=1, target_flops=1.0, verify=True)
    assert res.report["oracle"]["equivalent"]
    feeds = synthetic_inputs(proto, batch=2, seq=5, seed=1)
    np.testing.assert_allclose(run_model(res.model, feeds)[0], run_model(proto, feeds)[0], rtol=1e-5, atol=1e-5)


def test_branch_whose_sum_is_a_graph_output_and_broadcast_bias_is_not_a_branch():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x) => (float[N, 8] y, float[N, 8] z) <float[8, 8] w, float[8] b> {
        f = MatMul(x, w)
        y = Add(x, f)
        z = Add(y, b)
    }
    """
    m = onnx.parser.parse_model(text)
    m.graph.initializer.extend([onnx.numpy_helper.from_array(np.ones((8, 8), np.float32), "w"),
                                onnx.numpy_helper.from_array(np.ones(8, np.float32), "b")])
    branches = find_branches(Model.from_proto(m))
    assert [(b.shortcut, b.branch_output, b.output) for b in branches] == [("x", "f", "y")]
    shallow = remove_branches(Model.from_proto(m), branches).to_proto()
    onnx.checker.check_model(shallow, full_check=True)
    assert [o.name for o in shallow.graph.output] == ["y", "z"]
    feeds = {"x": np.arange(24, dtype=np.float32).reshape(3, 8)}
    y, z = run_model(shallow, feeds)
    np.testing.assert_array_equal(y, feeds["x"])
    np.testing.assert_array_equal(z, feeds["x"] + 1)
    assert check_depth_equivalence(m, shallow, branches)["equivalent"]


def test_kv_decoder_depth_and_head_pruning_oracle(tmp_path):
    """--depth with --prune-kv-cache: branches go, heads of the remaining attention shrink the cache;
    the oracle feeds the kept cache slices and skips removed cache tensors."""
    from models.kv_cache import build_kv_onnx

    path = build_kv_onnx("kv_mha", dynamo=False, tmpdir=tmp_path)
    shape = {"input_ids": (1, 8), **{f"past_{kv}.{i}": (1, 4, 8, 16) for kv in ("key", "value") for i in (0, 1)}}
    res = graphprune.prune(path, target_flops=0.6, depth=True, max_depth_fraction=0.5, prune_kv_cache=True,
                           verify=True, shape=shape)  # MACs at 8 new and 8 cached tokens
    assert len(res.report["depth"]["removed"]) == 2 and res.report["oracle"]["equivalent"]
    assert 0.5 <= res.report["macs_ratio"] <= 0.6  # whole heads are coarse: below the band, with a warning
    assert res.report.get("warnings")
    onnx.checker.check_model(res.model, full_check=True)
    with pytest.raises(graphprune.errors.BadInputError, match="after removing 2 residual branches"):
        graphprune.prune(path, target_flops=0.3, depth=True, max_depth_fraction=0.5, min_keep=1.0, shape=shape)
