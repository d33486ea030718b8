"""--recover: the PyTorch executor matches onnxruntime, write-back is by initializer name, and
distillation against the original improves held-out fidelity without touching the graph's
structure."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.errors import BadInputError
from graphprune.runtime import run_model, synthetic_inputs
from passes.recover import augment_tokens
from tests.conftest import make_model

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from graphprune.torch_exec import TorchGraph, unsupported_ops  # noqa: E402


def _agree(model: onnx.ModelProto, feeds: dict, tol: float = 1e-5) -> None:
    want = run_model(model, feeds)
    with torch.no_grad():
        got = TorchGraph(model).run(feeds)
    for w, o in zip(want, model.graph.output):
        g = got[o.name].numpy()
        assert g.shape == np.shape(w), o.name
        den = max(float(np.abs(w).max()), 1e-6)
        assert float(np.abs(np.asarray(w, np.float64) - g).max()) / den < tol, o.name


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from models.export import build_onnx
    from models.transformer import build_transformer_onnx

    tmp = tmp_path_factory.mktemp("recover")
    return {"mobilenet_v2": build_onnx("mobilenet_v2", False, str(tmp)),
            "shufflenet": build_onnx("shufflenet", True, str(tmp)),
            "hf_bert": build_transformer_onnx("hf_bert", True, str(tmp)),
            "llama_block": build_transformer_onnx("llama_block", False, str(tmp)),
            # SDPA attention: its masks go through IsNaN / Where
            "hf_gpt2_sdpa": build_transformer_onnx("hf_gpt2_sdpa", True, str(tmp))}


@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet", "hf_bert", "llama_block", "hf_gpt2_sdpa"])
def test_executor_matches_onnxruntime_on_exports(exported, name):
    model = onnx.load(exported[name])
    for batch in (1, 3):
        _agree(model, synthetic_inputs(model, batch=batch, seq=7, seed=batch), tol=1e-4)


OPS = {
    "slice_negative_step": ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 6, 5] x) => (float[2, 3, 5] y) {
            s = Constant <value = int64[1] {5}> ()
            e = Constant <value = int64[1] {-7}> ()
            a = Constant <value = int64[1] {1}> ()
            st = Constant <value = int64[1] {-2}> ()
            y = Slice (x, s, e, a, st)
        }""", {}),
    "split_sizes_and_pad": ("""<ir_version: 8, opset_import: ["" : 18]>
        g (float[2, 7, 4] x) => (float[2, 3, 6] y, float[2, 4, 4] z) {
            sz = Constant <value = int64[2] {3, 4}> ()
            p, z = Split <axis = 1> (x, sz)
            pads = Constant <value = int64[6] {0, 0, 1, 0, 0, 1}> ()
            v = Constant <value = float {0.5}> ()
            y = Pad (p, pads, v)
        }""", {}),
    "conv_same_upper_strided": ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 9, 8] x) => (float[2, 4, 5, 4] y) {
            y = Conv <auto_pad = "SAME_UPPER", strides = [2, 2], group = 1> (x, w, b)
        }""", {"w": (4, 3, 4, 3), "b": (4,)}),
    "conv_asymmetric_pads_groups": ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4, 7, 7] x) => (float[2, 4, 8, 6] y) {
            y = Conv <pads = [1, 0, 2, 1], group = 2, dilations = [1, 2]> (x, w)
        }""", {"w": (4, 2, 3, 2)}),
    "avgpool_pads_and_maxpool_ceil": ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 7, 7] x) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] z) {
            y = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x)
            z = MaxPool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1> (x)
        }""", {}),
    "gathernd_batch_dims": ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[2, 2, 4] y) {
            i = Constant <value = int64[2, 2, 1] {2, 0, 1, -1}> ()
            y = GatherND <batch_dims = 1> (x, i)
        }""", {}),
    "old_softmax_flattens_trailing_axes": ("""<ir_version: 7, opset_import: ["" : 11]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            y = Softmax <axis = 1> (x)
        }""", {}),
    "reduce_axes_input_and_layernorm": ("""<ir_version: 8, opset_import: ["" : 18]>
        g (float[2, 3, 4] x) => (float[2, 1, 4] y, float[2, 3, 4] z) {
            ax = Constant <value = int64[1] {1}> ()
            y = ReduceMean (x, ax)
            z = LayerNormalization <axis = -1, epsilon = 0.001> (x, s, b)
        }""", {"s": (4,), "b": (4,)}),
    "conv_transpose_asymmetric_pads_groups_dilation": ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4, 5, 6] x) => (float[2, 6, 11, 13] y) {
            y = ConvTranspose <strides = [2, 2], pads = [1, 0, 0, 2], output_padding = [1, 1], group = 2,
                               dilations = [1, 2]> (x, w, b)
        }""", {"w": (4, 3, 3, 3), "b": (6,)}),
    "conv_transpose_output_shape_and_same_upper": ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 5, 5] x) => (float[1, 2, 10, 9] y, float[1, 2, 10, 10] z) {
            y = ConvTranspose <strides = [2, 2], output_shape = [10, 9]> (x, w)
            z = ConvTranspose <strides = [2, 2], auto_pad = "SAME_UPPER"> (x, w)
        }""", {"w": (3, 2, 4, 3)}),
    "resize_nearest_and_linear_modes": ("""<ir_version: 8, opset_import: ["" : 18]>
        g (float[2, 3, 5, 6] x) => (float[2, 3, 10, 9] a, float[2, 3, 7, 11] b, float[2, 3, 3, 4] c,
                                    float[2, 3, 8, 13] d, float[2, 3, 10, 12] e) {
            s = Constant <value = float[4] {1, 1, 2, 1.5}> ()
            a = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (x, , s)
            sz = Constant <value = int64[4] {2, 3, 7, 11}> ()
            b = Resize <mode = "linear"> (x, , , sz)
            sd = Constant <value = int64[4] {2, 3, 3, 4}> ()
            c = Resize <mode = "nearest", nearest_mode = "round_prefer_ceil"> (x, , , sd)
            s2 = Constant <value = int64[4] {2, 3, 8, 13}> ()
            d = Resize <mode = "cubic", coordinate_transformation_mode = "align_corners", exclude_outside = 1> (x, , , s2)
            s3 = Constant <value = float[4] {1, 1, 2, 2}> ()
            e = Resize <mode = "linear", coordinate_transformation_mode = "pytorch_half_pixel"> (x, , s3)
        }""", {}),
    "resize_axes_and_half_pixel_symmetric": ("""<ir_version: 9, opset_import: ["" : 19]>
        g (float[2, 3, 5, 6] x) => (float[2, 3, 8, 6] y) {
            s = Constant <value = float[1] {1.7}> ()
            y = Resize <mode = "cubic", axes = [2], coordinate_transformation_mode = "half_pixel_symmetric"> (x, , s)
        }""", {}),
    "upsample_opset9": ("""<ir_version: 4, opset_import: ["" : 9]>
        g (float[1, 2, 3, 4] x) => (float[1, 2, 6, 12] y) {
            s = Constant <value = float[4] {1, 1, 2, 3}> ()
            y = Upsample <mode = "nearest"> (x, s)
        }""", {}),
    "scatter_and_cumsum_and_argmax": ("""<ir_version: 8, opset_import: ["" : 18]>
        g (float[4, 3, 5] x) => (float[4, 3, 5] y, float[4, 3, 5] z, float[4, 3, 5] c, int64[4, 1, 5] m) {
            i = Constant <value = int64[2, 2] {0, 1, -1, 2}> ()
            u = Constant <value = float[2, 5] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}> ()
            y = ScatterND <reduction = "add"> (x, i, u)
            j = Constant <value = int64[1, 1, 5] {0, 2, 1, 2, 0}> ()
            v = Constant <value = float[1, 1, 5] {-1, -2, -3, -4, -5}> ()
            z = ScatterElements <axis = 1> (x, j, v)
            ax = Constant <value = int64 {1}> ()
            c = CumSum <exclusive = 1, reverse = 1> (x, ax)
            m = ArgMax <axis = 1, select_last_index = 1> (x)
        }""", {}),
    "depth_space_and_predicates": ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8, 3, 4] x) => (float[2, 2, 6, 8] a, float[2, 2, 6, 8] b, float[2, 32, 3, 4] c,
                                   float[2, 8, 3, 4] d) {
            a = DepthToSpace <blocksize = 2, mode = "DCR"> (x)
            b = DepthToSpace <blocksize = 2, mode = "CRD"> (x)
            c2 = SpaceToDepth <blocksize = 2> (a)
            c = Concat <axis = 1> (c2, c2, c2, c2)
            n = IsNaN (x)
            inf = IsInf <detect_negative = 0> (x)
            bad = Or (n, inf)
            zero = Constant <value = float {0}> ()
            s = Sign (x)
            d = Where (bad, zero, s)
        }""", {}),
}


@pytest.mark.parametrize("case", sorted(OPS))
def test_executor_follows_the_op_spec(case):
    text, weights = OPS[case]
    model = make_model(text, weights)
    _agree(model, synthetic_inputs(model, batch=2, seed=3))


def test_unknown_op_is_named_in_one_line():
    model = make_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) { y = Hardmax (x) }""")
    assert unsupported_ops(model) == ["Hardmax"]
    with pytest.raises(BadInputError, match="no executor for Hardmax"):
        TorchGraph(model)


def test_weights_are_parameters_named_by_initializer_and_sharing_is_kept():
    model = make_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) {
            h = MatMul (x, w)
            r = Relu (h)
            y = MatMul (r, w)
        }""", {"w": (4, 4)})
    g = TorchGraph(model)
    assert g.trainable == ["w"] and len(g.parameters()) == 1     # used twice, trained once
    w = g.weights()["w"]
    np.testing.assert_array_equal(w, onnx.numpy_helper.to_array(model.graph.initializer[0]))
    g.load_weights({"w": w * 2})
    assert np.allclose(g.weights()["w"], 2 * w)


def test_augment_tokens_edits_every_sequence_input_alike():
    rng = np.random.default_rng(0)
    ids = np.arange(40).reshape(2, 20).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": ids.copy(), "token_type_ids": ids.copy()}
    out = augment_tokens(feeds, rng, drop=0.3, swap=0.3)
    assert out["input_ids"].shape[1] < 20                       # tokens were dropped
    assert (out["input_ids"][:, 0] == ids[:, 0]).all()          # the first token is always kept
    for k in ("attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(out[k], out["input_ids"])  # the same positions everywhere


def _mlp() -> onnx.ModelProto:
    return make_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 6] y) {
            h = MatMul (x, w1)
            hb = Add (h, b1)
            r = Relu (hb)
            y = MatMul (r, w2)
        }""", {"w1": (8, 32), "b1": (32,), "w2": (32, 6)}, seed=4)


def test_recovery_improves_heldout_fidelity_and_keeps_the_graph(tmp_path):
    model = _mlp()
    x = np.random.default_rng(5).standard_normal((160, 8)).astype(np.float32)
    kw = dict(target_flops=0.5, criterion="l1", round_to=1, calib=x, calib_samples=128, calib_heldout=32, seed=0)
    plain = graphprune.prune(model, **kw)
    rec = graphprune.prune(model, recover=True, recover_steps=150, recover_lr=1e-2, recover_batch=32, **kw)
    info = rec.report["recovery"]
    assert info["steps"] == 150 and info["kept"] == "recovered"
    assert info["fidelity_after"]["rel_err"] < 0.8 * info["fidelity_before"]["rel_err"]
    # the same pruned structure: identical nodes and initializer shapes, only values changed
    a, b = plain.model, rec.model
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    shapes = lambda m: {t.name: tuple(t.dims) for t in m.graph.initializer}  # noqa: E731
    assert shapes(a) == shapes(b)
    assert b.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"   # batch stays dynamic
    onnx.checker.check_model(b, full_check=True)
    # held-out samples of the run are the ones compared; measure independently on fresh data
    fresh = {"x": np.random.default_rng(6).standard_normal((64, 8)).astype(np.float32)}
    want = run_model(model, fresh)[0]
    err = lambda m: float(np.linalg.norm(run_model(m, fresh)[0] - want) / np.linalg.norm(want))  # noqa: E731
    assert err(b) < err(a)
    # the recovered ONNX graph and its torch twin agree
    with torch.no_grad():
        twin = TorchGraph(b).run(fresh)["y"].numpy()
    np.testing.assert_allclose(twin, run_model(b, fresh)[0], rtol=1e-4, atol=1e-5)


def test_recovery_never_lowers_heldout_fidelity(exported):
    model = onnx.load(exported["mobilenet_v2"])
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 3, 32, 32)).astype(np.float32)
    r = graphprune.prune(model, target_flops=0.5, calib=x, calib_samples=24, calib_heldout=16, recover=True,
                         recover_steps=4, recover_lr=5e-2, recover_batch=8)   # a step size meant to overshoot
    info = r.report["recovery"]
    assert info["heldout_objective_after"] >= info["heldout_objective_before"]
    if info["kept"] != "recovered":   # no gain: the weights it found are not written
        assert info["fidelity_after"] == info["fidelity_before"]
    assert r.report["fidelity"]["final"] == "after_recovery"


def test_cli_recover_end_to_end_and_bad_values(tmp_path, capsys):
    from graphprune.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(_mlp(), src)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(8).standard_normal((48, 8)).astype(np.float32))
    out = tmp_path / "out.onnx"
    rc = main([str(src), "--target-flops", "0.6", "--calib", str(tmp_path / "c.npz"), "--recover",
               "--recover-steps", "5", "-o", str(out), "--report", str(tmp_path / "r.json")])
    assert rc == 0 and out.exists()
    import json

    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["recovery"]["steps"] == 5
    printed = capsys.readouterr().out
    rec_line = next(ln for ln in printed.splitlines() if ln.startswith("recover  "))
    assert "5 steps" in rec_line and f"kept: {rep['recovery']['kept']}" in rec_line
    fid_line = next(ln for ln in printed.splitlines() if ln.startswith("fidelity  "))
    after = rep["fidelity"]["after_recovery"]["cosine"]
    assert fid_line.split("cosine ")[1].split(",")[0].split(" -> ")[-1] == f"{after:.4f}", fid_line
    assert "-> recovered)" in fid_line, fid_line
    out3 = tmp_path / "tune.onnx"   # a tuning flag without --recover would be silently ignored
    assert main([str(src), "--target-flops", "0.6", "--recover-steps", "5", "-o", str(out3)]) == 2
    err = capsys.readouterr().err.strip()
    assert not out3.exists() and len(err.splitlines()) == 1 and "add --recover" in err, err
    for bad in (["--recover-minutes", "0"], ["--recover-steps", "0"], ["--recover-lr", "-1"]):
        out2 = tmp_path / "bad.onnx"
        try:
            rc = main([str(src), "--target-flops", "0.6", "--recover", *bad, "-o", str(out2)])
        except SystemExit as exc:   # argparse rejects the value
            rc = exc.code
        assert rc == 2 and not out2.exists()
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "recover" in err, err


def test_transformer_recovery_matches_the_kept_residual_stream(exported):
    """With the hidden width kept, LayerNorm outputs keep the original's shape: they are matched too."""
    model = onnx.load(exported["hf_bert"])
    feeds = [synthetic_inputs(model, batch=4, seq=6, seed=s) for s in range(6)]
    r = graphprune.prune(model, target_flops=0.6, calib=feeds, recover=True, recover_steps=3, recover_batch=4)
    info = r.report["recovery"]
    assert info["matched_intermediates"] > 0 and info["steps"] == 3
    assert info["heldout_objective_after"] >= info["heldout_objective_before"]
    onnx.checker.check_model(r.model, full_check=True)


def _with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return m


def test_kept_channel_matching_agrees_with_the_mask_oracle(exported):
    """Right after an uncompensated prune, every anchor of the pruned graph equals the masked
    original (removed channels zeroed: the oracle's reference) at the plan's kept channels; the
    alignment used without a plan finds the same channels from the activations alone."""
    from graphprune.verify import masked_model
    from passes.recover_match import align_channels, anchor_tensors, plan_kept_channels

    model = onnx.load(exported["mobilenet_v2"])
    r = graphprune.prune(model, target_flops=0.5, criterion="l1", round_to=1)
    ctx = r.context
    anchors = anchor_tensors(ctx.original.to_proto(), r.model)
    assert len(anchors) >= 3
    masked = masked_model(ctx.original, ctx.dependency, ctx.plan.removed_labels(ctx.groups))
    feeds = synthetic_inputs(model, batch=2, seed=3)
    t_vals = dict(zip(anchors, run_model(_with_outputs(masked, anchors), feeds)[len(masked.graph.output):]))
    s_vals = dict(zip(anchors, run_model(_with_outputs(r.model, anchors), feeds)[len(r.model.graph.output):]))
    kept = plan_kept_channels(ctx, t_vals)
    narrowed = [a for a in anchors if t_vals[a].shape != s_vals[a].shape]
    assert narrowed and set(narrowed) <= set(kept)
    for a in anchors:
        t = t_vals[a]
        for axis, idx in kept.get(a, ()):
            assert np.all(np.diff(idx) > 0)
            t = np.take(t, idx, axis=axis)
        assert t.shape == s_vals[a].shape, a
        np.testing.assert_allclose(s_vals[a], t, rtol=1e-4, atol=1e-4 * float(np.abs(t).max()))
    for a in narrowed:    # the same channels from the activations (the teacher here: the original itself)
        (axis, want), = kept[a]
        got, quality = align_channels(t_vals[a], s_vals[a], axis)
        live = np.moveaxis(np.take(t_vals[a], want, axis=axis), axis, 0).reshape(len(want), -1).std(1) > 0
        assert quality > 0.9 * live.mean()   # a constant channel has no correlation to align by
        np.testing.assert_array_equal(got[live], want[live])


def test_align_channels_finds_an_increasing_subsequence():
    from passes.recover_match import align_channels

    rng = np.random.default_rng(0)
    t = rng.normal(size=(6, 20, 5, 5)).astype(np.float32)
    keep = np.array([1, 4, 5, 9, 13, 17, 19])
    s = t[:, keep] * 1.7 + 0.05 * rng.normal(size=(6, len(keep), 5, 5)).astype(np.float32)
    idx, quality = align_channels(t, s, 1)
    np.testing.assert_array_equal(idx, keep)
    assert quality > 0.95


def test_anchors_on_a_cnn_and_a_transformer(exported):
    """CNN: residual joins (Add of two same-shape activations) and the global pool's input;
    transformer: normalisation outputs (the Adds that only feed a LayerNorm are left to it)."""
    from passes.recover_match import MAX_ANCHORS, NORM_OPS, anchor_tensors

    cnn = onnx.load(exported["mobilenet_v2"])
    producers = {o: n for n in cnn.graph.node for o in n.output}
    got = anchor_tensors(cnn, cnn)
    kinds = {producers[a].op_type for a in got}
    assert "Add" in kinds and len(got) <= MAX_ANCHORS
    pool_inputs = {n.input[0] for n in cnn.graph.node if n.op_type.startswith("Global")}
    assert pool_inputs and pool_inputs <= set(got)
    depth = {o: i for i, n in enumerate(cnn.graph.node) for o in n.output}
    assert [depth[a] for a in got] == sorted(depth[a] for a in got)
    assert len(anchor_tensors(cnn, cnn, cap=3)) == 3 and anchor_tensors(cnn, cnn, cap=3)[-1] == got[-1]

    bert = onnx.load(exported["hf_bert"])
    producers = {o: n for n in bert.graph.node for o in n.output}
    got = anchor_tensors(bert, bert)
    assert got and all(producers[a].op_type in NORM_OPS for a in got)
    assert not {o.name for o in bert.graph.output} & set(got)
