"""YOLO detector exports (ultralytics YOLOv8 / YOLO11 / YOLOv5u style), rebuilt without ultralytics:
Conv+BN+SiLU, C2f with chunk and with split + Concat, SPPF max pools, an upsample + Concat neck,
C2PSA-style attention (view(B, C, H, W) with C read from the input's shape when H/W are dynamic),
and a decoupled Detect head with DFL (Reshape/Transpose/Softmax and a fixed arange 1x1 conv over
the reg_max axis), anchors and strides, boxes Concat classes.

What must hold: the backbone, neck and the head's inner convs prune to half the MACs; the last
box conv (4*reg_max channels, read by the DFL softmax) and the last class conv (reaches the
output) stay pinned; the oracle, onnx.checker's full check and the dynamic batch axis hold; with
dynamic H/W the synthetic check picks a size the model runs at and the MACs are costed at the
spatial hint size (not as if every feature map were 1x1).
"""
from __future__ import annotations

import math
import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphprune
from conftest import assert_oracle
from graphprune.cost import SPATIAL_HINT_SIZE
from graphprune.runtime import run_model, synthetic_inputs


class ConvBNSiLU(nn.Module):
    def __init__(self, c1, c2, k=1, s=1, g=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2 = ConvBNSiLU(c, c, 3), ConvBNSiLU(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """cv1 -> two halves (chunk or split) -> bottlenecks on the last half -> Concat -> cv2."""

    def __init__(self, c1, c2, n=1, shortcut=True, use_split=False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = ConvBNSiLU(c1, 2 * self.c)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))
        self.use_split = use_split

    def forward(self, x):
        y = self.cv1(x)
        y = list(y.split((self.c, self.c), 1) if self.use_split else y.chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = ConvBNSiLU(c1, c_), ConvBNSiLU(c_ * 4, c2)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Attention(nn.Module):
    """ultralytics' Attention: qkv 1x1 conv, heads of (key, key, head) dims, positional
    depthwise conv on v; the output view reads C from the input's shape."""

    def __init__(self, dim, num_heads=2, attn_ratio=0.5):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        self.qkv = ConvBNSiLU(dim, dim + self.key_dim * num_heads * 2)
        self.proj = ConvBNSiLU(dim, dim)
        self.pe = ConvBNSiLU(dim, dim, 3, g=dim)

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, self.num_heads, self.key_dim * 2 + self.head_dim, N).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        return self.proj(x)


class C2PSA(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c // 2
        self.cv1, self.cv2 = ConvBNSiLU(c, 2 * self.c), ConvBNSiLU(2 * self.c, c)
        self.attn = Attention(self.c, num_heads=max(1, self.c // 32))  # 2 heads of 32: pruned whole or kept
        self.ffn = nn.Sequential(ConvBNSiLU(self.c, self.c * 2), ConvBNSiLU(self.c * 2, self.c))

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        b = b + self.attn(b)
        b = b + self.ffn(b)
        return self.cv2(torch.cat((a, b), 1))


class Detect(nn.Module):
    """Decoupled head: per level a box branch (-> 4*reg_max) and a class branch (-> nc);
    DFL turns the box logits into distances, anchors and strides turn them into boxes."""

    def __init__(self, nc, ch, strides, reg_max=8):
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, reg_max, strides
        c2, c3 = max(16, ch[0] // 4, reg_max * 4), max(ch[0], nc)
        self.cv2 = nn.ModuleList(nn.Sequential(ConvBNSiLU(c, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for c in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(ConvBNSiLU(c, c3, 3), nn.Conv2d(c3, nc, 1)) for c in ch)
        self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(reg_max, dtype=torch.float).view(1, reg_max, 1, 1)

    def forward(self, xs):
        no = self.nc + 4 * self.reg_max
        outs, anchors, strides = [], [], []
        for i, x in enumerate(xs):
            outs.append(torch.cat((self.cv2[i](x), self.cv3[i](x)), 1))
            _, _, h, w = x.shape
            sx = torch.arange(w, dtype=torch.float32) + 0.5
            sy = torch.arange(h, dtype=torch.float32) + 0.5
            gy, gx = torch.meshgrid(sy, sx, indexing="ij")
            anchors.append(torch.stack((gx, gy), -1).view(-1, 2))
            strides.append(torch.full((h * w, 1), float(self.strides[i])))
        anchor = torch.cat(anchors).transpose(0, 1)
        stride = torch.cat(strides).transpose(0, 1)
        b = outs[0].shape[0]
        y = torch.cat([o.view(b, no, -1) for o in outs], 2)
        box, cls = y.split((4 * self.reg_max, self.nc), 1)
        a = box.shape[-1]
        dist = self.dfl(box.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = anchor.unsqueeze(0) - lt, anchor.unsqueeze(0) + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * stride
        return torch.cat((dbox, cls.sigmoid()), 1)


class TinyYolo(nn.Module):
    """Backbone P3/P4/P5 (strides 8/16/32) with C2f (split and chunk), SPPF and C2PSA; an
    upsample + Concat top-down neck and a strided-conv bottom-up path; a three-level Detect."""

    def __init__(self, nc=5, w=16):
        super().__init__()
        self.stem = nn.Sequential(ConvBNSiLU(3, w, 3, 2), ConvBNSiLU(w, 2 * w, 3, 2))
        self.p3 = nn.Sequential(ConvBNSiLU(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, use_split=True))
        self.p4 = nn.Sequential(ConvBNSiLU(4 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w))
        self.p5 = nn.Sequential(ConvBNSiLU(4 * w, 8 * w, 3, 2), SPPF(8 * w, 8 * w), C2PSA(8 * w))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n4 = C2f(12 * w, 4 * w, shortcut=False)
        self.n3 = C2f(8 * w, 4 * w, shortcut=False, use_split=True)
        self.down3 = ConvBNSiLU(4 * w, 4 * w, 3, 2)
        self.m4 = ConvBNSiLU(8 * w, 4 * w)
        self.detect = Detect(nc, (4 * w, 4 * w, 8 * w), (8, 16, 32))

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        n4 = self.n4(torch.cat((self.up(p5), p4), 1))
        n3 = self.n3(torch.cat((self.up(n4), p3), 1))
        m4 = self.m4(torch.cat((self.down3(n3), n4), 1))
        return self.detect([n3, m4, p5])


def _tiny_yolo() -> nn.Module:
    torch.manual_seed(0)
    model = TinyYolo()
    model.train()
    for m in model.modules():  # BN statistics from random images, so nothing saturates
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64))
    return model.eval()


def _export(tmp_path, opset: int, dynamic_hw: bool, size: int = 64) -> str:
    path = str(tmp_path / f"tiny_yolo_op{opset}_{'dyn' if dynamic_hw else 'static'}_{size}.onnx")
    if os.path.exists(path):
        return path
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(_tiny_yolo(), (torch.rand(1, 3, size, size),), path, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["output0"],
                          dynamic_axes={"images": axes, "output0": {0: "batch", 2: "anchors"}})
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One folder per module: each export is made once and shared by the tests."""
    return tmp_path_factory.mktemp("tiny_yolo")


def _prune_checked(path: str):
    """assert_oracle for dynamic H/W (its extra batch-7 check feeds 8x8 images, too small for
    stride 32): oracle at batch 1 and 3 (verify picks a size the original runs at), full checker,
    and the pruned model's output shape at batch 7, 96x96."""
    result = graphprune.prune(path, target_flops=0.5, verify=True)
    assert result.report["oracle"]["equivalent"], result.report["oracle"]
    onnx.checker.check_model(result.model, full_check=True)
    feeds = synthetic_inputs(onnx.load(path), batch=7, seq=96, seed=3)
    assert run_model(result.model, feeds)[0].shape == run_model(path, feeds)[0].shape
    return result


@pytest.mark.parametrize("dynamic_hw", [False, True], ids=["static_hw", "dynamic_hw"])
@pytest.mark.parametrize("opset", [12, 17])
def test_tiny_yolo_prunes_to_half(exports, opset, dynamic_hw):
    path = _export(exports, opset, dynamic_hw)
    result = _prune_checked(path) if dynamic_hw else assert_oracle(path, target_flops=0.5)
    assert 0.48 <= result.report["macs_ratio"] <= 0.5, result.report["macs_ratio"]
    dim0 = result.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")  # batch stays dynamic
    if dynamic_hw:
        for k in (2, 3):
            assert result.model.graph.input[0].type.tensor_type.shape.dim[k].dim_param
    # the pruned model runs at another resolution and keeps its output layout
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    out = run_model(result.model, {"images": x})[0]
    assert out.shape == (2, 4 + 5, 8 * 8 + 4 * 4 + 2 * 2)
    assert np.isfinite(out).all()
    # something in every part was removed: backbone C2f, the SPPF, the attention block, the neck,
    # the head's inner convs (BN is folded into the conv weights by the exporter: match node names)
    def widths(model):
        inits = {t.name: t.dims for t in model.graph.initializer}
        return {n.name: inits[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits}

    before, after = widths(onnx.load(path)), widths(result.model)
    shrunk = {name for name, c in after.items() if c < before[name]}
    for part in ("/p3.1/cv1/", "/p4.1/m.0/", "/p5.1/cv1/", "/p5.2/ffn", "/n3/cv2/",
                 "/detect/cv2.0/cv2.0.0/", "/detect/cv3.0/cv3.0.0/"):
        assert any(part in name for name in shrunk), (part, sorted(shrunk))
    for name, c in after.items():  # the box and class output convs and the DFL conv keep their widths
        if "/cv2.0.1/" in name or "/cv3.0.1/" in name or "/dfl/" in name:
            assert c == before[name], name

def test_tiny_yolo_head_pins(exports):
    """The last box conv feeds the DFL softmax over reg_max (a fixed axis) and the last class
    conv reaches the output: both pinned, with reasons; the DFL conv's reg_max input too."""
    analysis = graphprune.analyze(_export(exports, 17, False))
    pinned = {(p.tensor, p.axis): p.reason for p in analysis.pinned}
    for i in range(3):
        assert "Softmax" in pinned[(f"detect.cv2.{i}.1.weight", 0)]
        assert "graph output" in pinned[(f"detect.cv3.{i}.1.weight", 0)]
    grouped = {(m.tensor, m.axis) for g in analysis.groups for m in g.members if m.is_weight}
    assert ("detect.dfl.weight", 1) not in grouped
    # the branches' inner convs are prunable (BN is folded into them: find them by node name)
    nodes = {n for g in analysis.groups for n in g.nodes}
    for i in range(3):
        assert any(f"/detect/cv2.{i}/cv2.{i}.0/" in n for n in nodes), sorted(nodes)[:10]
        assert any(f"/detect/cv3.{i}/cv3.{i}.0/" in n for n in nodes), sorted(nodes)[:10]


def test_dynamic_hw_costs_at_hint_size(exports):
    """Dynamic H/W: each conv is costed at the size the hint resolution gives it, so the MACs
    equal those of the same model exported at that fixed size (not 1x1 feature maps)."""
    dyn = graphprune.analyze(_export(exports, 17, True))
    static = graphprune.analyze(_export(exports, 17, False, size=SPATIAL_HINT_SIZE))
    conv_dyn = {k: v for k, v in dyn.cost.per_node.items() if "Conv" in k}
    conv_static = {k: v for k, v in static.cost.per_node.items() if "Conv" in k}
    assert conv_dyn.keys() == conv_static.keys()
    for k in conv_static:
        assert math.isclose(conv_dyn[k], conv_static[k]), (k, conv_dyn[k], conv_static[k])
