"""Regressions found by the robustness sweep over models graphprune had not seen before
(torchvision, transformers and hand-built graphs at several opsets and exporters)."""
from __future__ import annotations

import onnx
import pytest

import graphprune

from conftest import assert_oracle
from test_oprules import build, group_sizes, i64, sandwich

PRUNE = dict(target_flops=0.6, round_to=1)


# -- Tile: output element j of a tiled axis is input element j mod n -----------------------------

def test_tile_identity_repeats_keep_channels_prunable():
    model = sandwich("m = Tile (h, rep)", {"rep": i64(1, 1, 1, 1)})
    assert group_sizes(model) == [8]
    assert_oracle(model, **PRUNE)


def test_tile_on_channel_axis_prunes_every_copy():
    # 8 channels tiled twice -> 16; the consumer sees channel c at c and c + 8
    model = sandwich("m = Tile (h, rep)", {"rep": i64(1, 2, 1, 1)}, mid_c=16)
    assert group_sizes(model) == [8]
    result = assert_oracle(model, **PRUNE)
    w2 = {i.name: i for i in result.model.graph.initializer}["W2"]
    w1 = {i.name: i for i in result.model.graph.initializer}["W1"]
    assert w2.dims[1] == 2 * w1.dims[0] < 16


def test_tile_on_spatial_axes_ties_channels():
    model = sandwich("t = Tile (h, rep)\n  m = MaxPool <kernel_shape=[2,2], strides=[2,2]> (t)",
                     {"rep": i64(1, 1, 2, 2)})
    assert group_sizes(model) == [8]
    assert_oracle(model, **PRUNE)


def test_tile_with_runtime_repeats_pins_with_reason():
    body = "  h = Conv <pads=[1,1,1,1]> (x, W1, B1)\n  m = Tile (h, r)\n  y = Conv (m, W2, B2)"
    model = build(body, {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 8, 1, 1), "B2": (4,)},
                  x="float[N,3,8,8] x, int64[4] r", y="float[N,4,A,B] y")
    reasons = {p.reason for p in graphprune.analyze(model).pinned}
    assert any("repeats computed at run time" in r for r in reasons), reasons


# -- Gather with a constant index list on an activation's axis: a channel selection ---------------

def _weights(result):
    return {i.name: tuple(i.dims) for i in result.model.graph.initializer}


def test_gather_channel_permutation_is_prunable():
    model = sandwich("m = Gather <axis=1> (h, idx)", {"idx": i64(0, 2, 4, 6, 1, 3, 5, 7)})
    assert group_sizes(model) == [8]
    result = assert_oracle(model, **PRUNE)
    assert _weights(result)["W1"][0] == _weights(result)["W2"][1] < 8


def test_gather_channel_subset_with_repeats_and_negative_indices():
    # channels 1, 2, 4, 6 are never read: they form their own group (removing them is free)
    model = sandwich("m = Gather <axis=1> (h, idx)", {"idx": i64(7, 0, 0, 3, -1, 5)}, mid_c=6)
    assert group_sizes(model) == [4, 4]
    assert_oracle(model, **PRUNE)


def test_gather_negative_axis_and_spatial_selection():
    assert_oracle(sandwich("m = Gather <axis=-3> (h, idx)", {"idx": i64(1, 0, 3, 2, 5, 4, 7, 6)}), **PRUNE)
    model = sandwich("g = Gather <axis=2> (h, idx)\n  m = Gather <axis=3> (g, idx)", {"idx": i64(7, 6, 5, 4, 3, 2, 1, 0)})
    assert group_sizes(model) == [8]
    assert_oracle(model, **PRUNE)


def test_gather_runtime_indices_on_channel_axis_stay_pinned():
    body = "  h = Conv <pads=[1,1,1,1]> (x, W1, B1)\n  m = Gather <axis=1> (h, r)\n  y = Conv (m, W2, B2)"
    model = build(body, {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 8, 1, 1), "B2": (4,)},
                  x="float[N,3,8,8] x, int64[8] r", y="float[N,4,8,8] y")
    assert not graphprune.analyze(model).groups


# -- DepthToSpace / SpaceToDepth (pixel shuffle): a channel owns a block of bs*bs channels ---------

def _width(model):
    return [(g.size, g.width) for g in graphprune.analyze(model).groups]


def test_depth_to_space_dcr_and_crd_prune_whole_blocks():
    for mode in ("DCR", "CRD"):
        model = sandwich(f'm = DepthToSpace <blocksize=2, mode="{mode}"> (h)', c=16, mid_c=4, out_hw=16)
        assert _width(model) == [(4, 4)], mode  # 4 output channels, each 4 input channels
        result = assert_oracle(model, **PRUNE)
        assert _weights(result)["W1"][0] == 4 * _weights(result)["W2"][1] < 16


def test_space_to_depth_and_round_trips():
    model = sandwich("m = SpaceToDepth <blocksize=2> (h)", mid_c=32, out_hw=4)
    assert _width(model) == [(8, 1)]
    assert_oracle(model, **PRUNE)
    assert_oracle(sandwich("d = SpaceToDepth <blocksize=2> (h)\n  m = DepthToSpace <blocksize=2> (d)"), **PRUNE)
    assert_oracle(sandwich('d = DepthToSpace <blocksize=2, mode="CRD"> (h)\n  m = SpaceToDepth <blocksize=2> (d)',
                           c=16, mid_c=16), **PRUNE)


def test_torch_pixel_shuffle_export_prunes(tmp_path):
    import torch
    from models.export import export_onnx

    class SubPixel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.up = torch.nn.PixelShuffle(2)      # 32 -> 8 channels at 2x resolution
            self.head = torch.nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return self.head(torch.relu(self.up(self.body(x))))

    torch.manual_seed(0)
    path = export_onnx(SubPixel(), tmp_path / "subpixel.onnx", dynamo=False, input_shape=(1, 3, 8, 8), opset=13)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "DepthToSpace" in ops
    groups = graphprune.analyze(path).groups
    assert [(g.size, g.width) for g in groups] == [(8, 4)]
    assert_oracle(path, **PRUNE)


# -- Slice with a step other than 1 on a channel axis (x[:, ::2], x.flip(1) as a slice) ------------

def _strided(st, en, sp, mid_c):
    extra = {"st": i64(st), "en": i64(en), "ax": i64(1), "sp": i64(sp)}
    return sandwich("m = Slice (h, st, en, ax, sp)", extra, c=16, mid_c=mid_c, opset=13)


def test_strided_channel_slice_is_prunable():
    model = _strided(0, 16, 2, 8)
    # the even channels feed the consumer; the odd ones are never read (their own group)
    assert _width(model) == [(8, 1), (8, 1)]
    result = assert_oracle(model, **PRUNE)
    assert "Gather" in {n.op_type for n in result.model.graph.node}  # kept elements are no longer evenly spaced


def test_reversed_and_offset_strided_slices():
    assert _width(_strided(-1, -9223372036854775807, -1, 16)) == [(16, 1)]
    assert_oracle(_strided(-1, -9223372036854775807, -1, 16), **PRUNE)
    assert sorted(g.size for g in graphprune.analyze(_strided(1, 100, 3, 5)).groups) == [5, 11]
    assert_oracle(_strided(1, 100, 3, 5), **PRUNE)


def test_torch_strided_channel_slice_export(tmp_path):
    import torch
    from models.export import export_onnx

    class EveryOther(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.c2 = torch.nn.Conv2d(16, 8, 1)

        def forward(self, x):
            return self.c2(torch.relu(self.c1(x))[:, ::2])

    torch.manual_seed(0)
    for dynamo in (False, True):
        path = export_onnx(EveryOther(), tmp_path / f"strided{dynamo}.onnx", dynamo=dynamo, input_shape=(1, 3, 8, 8))
        report = assert_oracle(path, target_flops=0.5).report
        assert 0.48 * report["macs_before"] <= report["macs_after"] <= 0.5 * report["macs_before"]


# -- Einsum: same label, same elements -----------------------------------------------------------

def test_einsum_as_pointwise_conv_and_channel_scale():
    model = sandwich('m = Einsum <equation="nchw,dc->ndhw"> (h, We)', {"We": (6, 8)}, mid_c=6)
    assert sorted(_width(model)) == [(6, 1), (8, 1)]
    result = assert_oracle(model, **PRUNE)
    assert _weights(result)["We"][1] == _weights(result)["W1"][0]
    assert _weights(result)["We"][0] == _weights(result)["W2"][1]
    assert_oracle(sandwich('m = Einsum <equation="nchw,c->nchw"> (h, s)', {"s": (8,)}), **PRUNE)


def test_einsum_sum_within_one_operand_and_ellipsis_pin():
    summed = sandwich('s = Einsum <equation="nchw->nhw"> (h)\n  u = Unsqueeze (s, a)\n  m = Mul (h, u)',
                      {"a": i64(1)}, opset=13)
    assert not graphprune.analyze(summed).groups
    assert "sums this axis" in " ".join(p.reason for p in graphprune.analyze(summed).pinned)
    ellipsis = sandwich('m = Einsum <equation="...chw,dc->...dhw"> (h, We)', {"We": (6, 8)}, mid_c=6)
    assert not graphprune.analyze(ellipsis).groups


def test_torch_einsum_attention_prunes_whole_heads(tmp_path):
    import torch
    from models.export import export_onnx

    class EinsumAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Conv2d(3, 32, 4, stride=4)
            self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))

        def forward(self, x):
            t = self.inp(x).flatten(2).transpose(1, 2)
            b, n, _ = t.shape
            q, k, v = (f(t).view(b, n, 4, 8) for f in (self.q, self.k, self.v))
            a = torch.einsum("bnhd,bmhd->bhnm", q, k).softmax(-1)
            return self.o(torch.einsum("bhnm,bmhd->bnhd", a, v).reshape(b, n, 32))

    torch.manual_seed(0)
    path = export_onnx(EinsumAttention(), tmp_path / "einsum.onnx", dynamo=False, input_shape=(1, 3, 16, 16))
    assert "Einsum" in {n.op_type for n in onnx.load(path).graph.node}
    assert (4, 8) in _width(path)  # 4 heads of 8, across q, k, v and o
    for head_dim in (False, True):
        assert_oracle(path, target_flops=0.5, head_dim=head_dim)


# -- an input that itself fails onnx's strict type check (TorchScript's T5 export at opset 11) -----

def test_input_failing_strict_inference_is_not_an_internal_error():
    # Min on int64 is only allowed from opset 12; onnxruntime runs it, onnx's full check refuses it
    body = ("  h = Conv <pads=[1,1,1,1]> (x, W1, B1)\n  r = Relu (h)\n  y = Conv (r, W2, B2)\n"
            "  s = Shape (x)\n  z = Min (s, cap)")
    model = build(body, {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 8, 1, 1), "B2": (4,), "cap": i64(5, 5, 5, 5)},
                  opset=11, y="float[N,4,8,8] y, int64[4] z")
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(model, full_check=True)
    # was an internal error (exit 1): the output check let InferenceError through
    result = graphprune.prune(model, target_flops=0.6, round_to=1)
    assert any("input model fails onnx.checker too" in w for w in result.report["warnings"])
    assert result.report["macs_after"] < result.report["macs_before"]
    # onnxruntime refuses the model too, so the oracle cannot run: bad input, not a crash
    with pytest.raises(graphprune.errors.BadInputError, match="original model itself does not run"):
        graphprune.prune(model, target_flops=0.6, round_to=1, verify=True)
