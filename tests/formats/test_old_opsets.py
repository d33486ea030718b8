"""Old opsets (7-11) and old IR versions (3-6): the op versions whose parameters are attributes
(Slice-1, Pad-2, Clip-6, Split-2, Squeeze/Unsqueeze-1, ReduceMean-1, Upsample, Dropout-7 with a
mask, BatchNormalization-7 with ``spatial``, also per-element: spatial=0), initializers listed as graph inputs (IR 3), and the
run-time reshapes TorchScript writes before opset 13 (Shape -> Gather -> Unsqueeze-1 -> Concat),
which onnx's own data propagation cannot follow. Every case prunes to half the MACs, passes the
mask-equivalence oracle and onnx.checker, and keeps the input's IR version and opsets."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

import graphprune
from graphprune.errors import BadInputError

from conftest import assert_oracle, random_weight

pytest.importorskip("onnxruntime")

TARGET = 0.5
BAND = (TARGET - 0.02, TARGET)  # the band --target-flops promises


def _ir(opset: int) -> int:
    """The IR version an exporter of that time wrote."""
    return 3 if opset <= 7 else 4 if opset <= 9 else 5 if opset == 10 else 6 if opset <= 11 else 7


def _finish(text: str, weights: dict, *, ir: int, as_inputs: bool, seed: int = 0) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, spec in weights.items():
        arr = spec if isinstance(spec, np.ndarray) else random_weight(rng, spec)
        model.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
        if as_inputs:  # IR < 4 requires it; later exporters (Caffe2, old paddle2onnx) still do it
            model.graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
    assert model.ir_version == ir
    onnx.checker.check_model(model, full_check=True)
    return model


def cnn(middle: str, opset: int, extra: dict | None = None, *, mid_c: int = 32,
        as_inputs: bool | None = None) -> onnx.ModelProto:
    """x -> Conv(32) -> BatchNorm -> Relu -> h -> `middle` (writes m, mid_c channels) -> Conv(32) -> Relu
    -> GlobalAveragePool -> Flatten -> Gemm(10), at `opset` with that opset's IR version."""
    ir = _ir(opset)
    bn = "<spatial=1, epsilon=1e-5>" if opset <= 8 else "<epsilon=1e-5>"
    body = (f"  h0 = Conv <pads=[1,1,1,1]> (x, W1, B1)\n  b = BatchNormalization {bn} (h0, S1, O1, M1, V1)\n"
            f"  h = Relu (b)\n  {middle}\n  c2 = Conv <pads=[1,1,1,1]> (m, W2, B2)\n  r2 = Relu (c2)\n"
            f"  p = GlobalAveragePool (r2)\n  f = Flatten <axis=1> (p)\n  y = Gemm <transB=1> (f, Wf, Bf)")
    text = (f'<ir_version: {ir}, opset_import: ["" : {opset}]>\n'
            f'g (float[N,3,16,16] x) => (float[N,10] y) {{\n{body}\n}}')
    rng = np.random.default_rng(1)
    weights = {"W1": (32, 3, 3, 3), "B1": (32,), "S1": rng.uniform(0.5, 1.5, 32).astype(np.float32),
               "O1": (32,), "M1": (32,), "V1": rng.uniform(0.5, 1.5, 32).astype(np.float32),
               "W2": (32, mid_c, 3, 3), "B2": (32,), "Wf": (10, 32), "Bf": (10,), **(extra or {})}
    return _finish(text, weights, ir=ir, as_inputs=ir < 4 if as_inputs is None else as_inputs)


def check(model: onnx.ModelProto, groups: list[int] | None = None) -> graphprune.PruneResult:
    """Prune to half the MACs: oracle and checker (assert_oracle), the MACs band, IR and opsets kept."""
    if groups is not None:
        assert sorted(g.size for g in graphprune.analyze(model).groups) == sorted(groups)
    result = assert_oracle(model, target_flops=TARGET, round_to=1)
    assert BAND[0] <= result.report["macs_ratio"] <= BAND[1], result.report["macs_ratio"]
    out = result.model
    assert out.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    inits = {i.name: tuple(i.dims) for i in out.graph.initializer}
    declared = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim) for vi in out.graph.input}
    for name in set(inits) & set(declared):  # initializers listed as inputs keep matching shapes
        assert declared[name] == inits[name], name
    if model.ir_version < 4:
        assert set(inits) <= set(declared), "IR 3 needs every initializer listed as a graph input"
    return result


def i64(*v):
    return np.array(v, dtype=np.int64)


def f32(*v):
    return np.array(v, dtype=np.float32)


SE = {"Wa": (8, 32), "Ba": (8,), "Wb": (32, 8), "Bb": (32,)}

# name: (middle, opset, extra weights, mid_c, expected group sizes)
CASES = {
    "clip6_attrs": ("m = Clip <min=0.0, max=6.0> (h)", 9, {}, 32, [32, 32]),
    "pad2_attrs": ('m0 = Pad <pads=[0,0,1,1,0,0,1,1], mode="constant"> (h)\n  m = MaxPool <kernel_shape=[3,3]> (m0)',
                   9, {}, 32, [32, 32]),
    "pad2_reflect_ir3": ('m0 = Pad <pads=[0,0,1,1,0,0,1,1], mode="reflect"> (h)\n'
                         '  m = AveragePool <kernel_shape=[3,3]> (m0)', 7, {}, 32, [32, 32]),
    "upsample7_attr_scales": ('u = Upsample <scales=[1.0,1.0,2.0,2.0], mode="nearest"> (h)\n'
                              '  m = MaxPool <kernel_shape=[2,2], strides=[2,2]> (u)', 7, {}, 32, [32, 32]),
    "upsample9_input_scales": ('u = Upsample <mode="nearest"> (h, sc)\n'
                               '  m = MaxPool <kernel_shape=[2,2], strides=[2,2]> (u)', 9, {"sc": f32(1, 1, 2, 2)},
                               32, [32, 32]),
    "resize10": ('u = Resize <mode="nearest"> (h, sc)\n  m = MaxPool <kernel_shape=[2,2], strides=[2,2]> (u)',
                 10, {"sc": f32(1, 1, 2, 2)}, 32, [32, 32]),
    "split2_attr_split": ("a, c = Split <axis=1, split=[8,24]> (h)\n  a2 = Relu (a)\n  m = Concat <axis=1> (c, a2)",
                          9, {}, 32, [8, 24, 32]),
    "split2_equal_ir3": ("a, c = Split <axis=1> (h)\n  a2 = Sigmoid (a)\n  m = Concat <axis=1> (a2, c)",
                         7, {}, 32, [16, 16, 32]),
    "slice1_channel_attrs": ("m = Slice <starts=[0], ends=[16], axes=[1]> (h)", 9, {}, 16, [16, 16, 32]),
    "slice1_spatial_attrs": ("s = Slice <starts=[1,1], ends=[15,15], axes=[2,3]> (h)\n"
                             "  m = Pad <pads=[0,0,1,1,0,0,1,1]> (s)", 8, {}, 32, [32, 32]),
    "slice10_inputs": ("m = Slice (h, st, en, ax)", 10, {"st": i64(0), "en": i64(16), "ax": i64(1)}, 16,
                       [16, 16, 32]),
    "squeeze1_unsqueeze1_se": ("g = GlobalAveragePool (h)\n  g2 = Squeeze <axes=[2,3]> (g)\n"
                               "  e1 = Gemm <transB=1> (g2, Wa, Ba)\n  e2 = Relu (e1)\n"
                               "  e3 = Gemm <transB=1> (e2, Wb, Bb)\n  e4 = Sigmoid (e3)\n"
                               "  e5 = Unsqueeze <axes=[2,3]> (e4)\n  m = Mul (h, e5)", 9, SE, 32, [8, 32, 32]),
    "reducemean1_axes_attr": ("g = ReduceMean <axes=[2,3], keepdims=0> (h)\n  e = Sigmoid (g)\n"
                              "  e2 = Unsqueeze <axes=[2,3]> (e)\n  m = Mul (h, e2)", 10, {}, 32, [32, 32]),
    "dropout10_ratio_attr": ("m = Dropout <ratio=0.3> (h)", 10, {}, 32, [32, 32]),
    "sum8_variadic": ("a = Sigmoid (h)\n  a2 = Tanh (h)\n  m = Sum (h, a, a2)", 8, {}, 32, [32, 32]),
    "batchnorm7_spatial0": ("m = BatchNormalization <spatial=0> (h, S2, O2, M2, V2)", 7,
                            {"S2": np.linspace(0.5, 1.5, 32 * 256, dtype=np.float32).reshape(32, 16, 16),
                             "O2": (32, 16, 16), "M2": (32, 16, 16),
                             "V2": np.linspace(1.5, 0.5, 32 * 256, dtype=np.float32).reshape(32, 16, 16)}, 32, [32, 32]),
    "unsqueeze1_on_a_bias": ("bb = Unsqueeze <axes=[1,2]> (Bx)\n  m = Add (h, bb)", 9, {"Bx": (32,)}, 32, [32, 32]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_old_op_version_prunes_to_half(name):
    middle, opset, extra, mid_c, groups = CASES[name]
    check(cnn(middle, opset, extra, mid_c=mid_c), groups)


def test_initializers_listed_as_inputs_above_ir3():
    # IR 4+ allows it and old exporters kept doing it: the declared input shapes follow the slicing
    check(cnn("m = Identity (h)", 9, as_inputs=True), [32, 32])


# -- Dropout-7 with its mask output: onnx infers only output 0 --------------------------------------

@pytest.mark.parametrize("opset", [7, 9])
def test_dropout7_mask_output_does_not_pin(opset):
    # the mask has the input's shape (and, before opset 10, its type); unknown, it pinned the channels
    model = cnn("m, mk = Dropout <ratio=0.3> (h)", opset)
    check(model, [32, 32])


# -- run-time reshapes built with Unsqueeze-1 (TorchScript Linear on 3-D input before opset 13) ----

def _linear_stack(opset: int, blocks: int) -> onnx.ModelProto:
    """`blocks` x (reshape [b, s, 16] -> [-1, 16], Gemm 16 -> 32, reshape back to [b, s, 32] from the
    Shape of the block input, Div by a scalar, the same to 16): how torch.onnx (TorchScript) writes
    Conv1D/addmm before opset 13. Only the last block's output width reaches the graph output."""
    lines, weights, x = [], {}, "x"
    for k in range(blocks):
        skip = x
        for j, (cin, cout) in enumerate(((16, 32), (32, 16))):
            p = f"b{k}{j}"
            lines += [
                f"{p}s = Shape ({x})", f"{p}g0 = Gather <axis=0> ({p}s, I0)", f"{p}g1 = Gather <axis=0> ({p}s, I1)",
                f"{p}u0 = Unsqueeze <axes=[0]> ({p}g0)", f"{p}u1 = Unsqueeze <axes=[0]> ({p}g1)",
                f"{p}t = Concat <axis=0> ({p}u0, {p}u1, C{cout})",
                f"{p}f = Reshape ({x}, F{cin})", f"{p}mm = Gemm ({p}f, {p}W, {p}B)",
                f"{p}r = Reshape ({p}mm, {p}t)", f"{p}d = Div ({p}r, K)",
                f"{p}o = Relu ({p}d)" if j == 0 else f"{p}o = Add ({p}d, {skip})",
            ]
            weights[f"{p}W"], weights[f"{p}B"] = (cin, cout), (cout,)
            x = f"{p}o"
    lines.append(f"y = Identity ({x})")
    weights.update({"I0": np.array(0, np.int64), "I1": np.array(1, np.int64), "C32": i64(32), "C16": i64(16),
                    "F16": i64(-1, 16), "F32": i64(-1, 32), "K": np.array(2.0, np.float32)})
    ir = _ir(opset)
    text = (f'<ir_version: {ir}, opset_import: ["" : {opset}]>\n'
            f'g (float[batch,seq,16] x) => (float[batch,seq,16] y) {{\n  ' + "\n  ".join(lines) + "\n}")
    return _finish(text, weights, ir=ir, as_inputs=ir < 4)


@pytest.mark.parametrize("opset", [9, 10, 11])
def test_runtime_reshape_round_trip_before_opset13(opset):
    # [b*s, 32] -> [b, s, 32]: the target comes from the Shape of another tensor through Unsqueeze-1,
    # and the Div after it had no inferred shape at all; each block's 32-wide hidden layer is a group
    model = _linear_stack(opset, blocks=5)
    analysis = graphprune.analyze(model)
    hidden = [g for g in analysis.groups if g.size == 32]
    assert len(hidden) == 5, [(g.size) for g in analysis.groups]
    check(model)


# -- the Python exporter's own pattern, when torch is there -----------------------------------------

@pytest.mark.parametrize("opset", [9, 10])
def test_torchscript_linear_on_3d_input_old_opset(tmp_path, opset):
    torch = pytest.importorskip("torch")
    from models.export import export_onnx

    class Conv1D(torch.nn.Module):  # GPT-2's Conv1D: addmm on x.view(-1, C), then view back
        def __init__(self, cin: int, cout: int, g):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(cin, cout, generator=g) / cin ** 0.5)
            self.b = torch.nn.Parameter(torch.randn(cout, generator=g))

        def forward(self, x):
            return torch.addmm(self.b, x.reshape(-1, x.size(-1)), self.w).view(x.size(0), x.size(1), -1)

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.fc = torch.nn.ModuleList(Conv1D(16, 32, g) for _ in range(3))
            self.proj = torch.nn.ModuleList(Conv1D(32, 16, g) for _ in range(3))

        def forward(self, x):
            for fc, proj in zip(self.fc, self.proj):
                x = x + proj(torch.tanh(fc(x)) * 0.5)
            return x

    path = export_onnx(Blocks(), tmp_path / "m.onnx", dynamo=False, input_shape=(2, 5, 16), opset=opset)
    model = onnx.load(path)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert sum(g.size == 32 for g in graphprune.analyze(model).groups) == 3
    check(model)


def test_opset_below_7_is_a_one_line_bad_input():
    text = '<ir_version: 3, opset_import: ["" : 6]>\ng (float[N,4] x) => (float[N,4] y) {\n  y = Relu (x)\n}'
    with pytest.raises(BadInputError, match="unsupported opset 6"):
        graphprune.analyze(onnx.parser.parse_model(text))


# -- rewriting a run-time shape before opset 9 (no Where; Greater on floats only) ------------------

@pytest.mark.parametrize("opset", [7, 8])
def test_runtime_flatten_shape_with_a_channel_entry(opset):
    # paddle2onnx's flatten before the classifier: Reshape(p, Concat(Slice(Shape(p), 0:1), [32]));
    # the 32 entry is rewritten in the run-time shape without Where (opset 9)
    model = cnn("m = Identity (h)", opset)
    for n in model.graph.node:
        if n.op_type == "Flatten":
            n.op_type, n.input[:] = "Reshape", [n.input[0], "fs"]
            n.ClearField("attribute")
    model.graph.node.extend([
        onnx.helper.make_node("Shape", ["p"], ["ps"]),
        onnx.helper.make_node("Slice", ["ps"], ["pb"], starts=[0], ends=[1], axes=[0]),
        onnx.helper.make_node("Concat", ["pb", "c32"], ["fs"], axis=0),
    ])
    model.graph.initializer.append(onnx.numpy_helper.from_array(i64(32), "c32"))
    if model.ir_version < 4:
        model.graph.input.append(onnx.helper.make_tensor_value_info("c32", onnx.TensorProto.INT64, [1]))
    model = _topo(model)
    onnx.checker.check_model(model, full_check=True)
    result = check(model, [32, 32])
    ops = {n.op_type for n in result.model.graph.node}
    assert "Where" not in ops


def _topo(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in topological order (appended shape nodes feed an earlier Reshape)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    if model.ir_version < 4:  # gs drops initializers from the inputs
        names = {i.name for i in out.graph.input}
        for init in out.graph.initializer:
            if init.name not in names:
                out.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    return out


def _folded_runtime(opset: int) -> onnx.ModelProto:
    """x [batch, 5, 64] -> q [batch, 5, 4, 16] -> [batch, 4, 5, 16] -> [batch*4, 5, 16], that first entry
    computed at run time (Shape -> Slice-1 -> Mul 4) -> attention of q with itself -> back -> y."""
    text = f'''<ir_version: {_ir(opset) if opset >= 8 else 4}, opset_import: ["" : {opset}]>
g (float[batch,5,64] x) => (float[batch,5,64] y) {{
  q = MatMul (x, wq)
  q4 = Reshape (q, s4)
  qt = Transpose <perm=[0,2,1,3]> (q4)
  xs = Shape (x)
  b = Slice <starts=[0], ends=[1], axes=[0]> (xs)
  bh = Mul (b, four)
  s3 = Concat <axis=0> (bh, tail)
  m = Reshape (qt, s3)
  mt = Transpose <perm=[0,2,1]> (m)
  sc = MatMul (m, mt)
  p = Softmax <axis=2> (sc)
  r = MatMul (p, m)
  rb = Reshape (r, sb)
  rt = Transpose <perm=[0,2,1,3]> (rb)
  h = Reshape (rt, s2)
  y = MatMul (h, wo)
}}'''
    rng = np.random.default_rng(1)
    weights = {"wq": (rng.standard_normal((64, 64)) / 8).astype(np.float32),
               "wo": (rng.standard_normal((64, 64)) / 8).astype(np.float32),
               "s4": i64(0, 5, 4, 16), "four": i64(4), "tail": i64(5, 16), "sb": i64(-1, 4, 5, 16),
               "s2": i64(0, 5, 64)}
    model = onnx.parser.parse_model(text)
    return _finish(text, weights, ir=model.ir_version, as_inputs=model.ir_version < 4)


@pytest.mark.parametrize("opset", [8, 9])
def test_folded_heads_with_runtime_shape_before_opset9(opset):
    model = _folded_runtime(opset)
    heads = [g for g in graphprune.analyze(model).groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].size == 4
    result = assert_oracle(model, target_flops=0.6, round_to=1)
    out = result.model
    assert out.ir_version == model.ir_version and out.opset_import[0].version == opset
    kept = {i.name: list(i.dims) for i in out.graph.initializer}
    assert kept["wq"][1] in (16, 32, 48)
    assert ("Where" in {n.op_type for n in out.graph.node}) == (opset >= 9)


# -- a node whose output has no inferable rank, beside a pruned path ---------------------------------

def test_reshape_of_unknown_rank_beside_a_pruned_path():
    # z = Reshape(x, s) with s a graph input of unknown length: z has no rank; the rewrite used to fail
    # on it (internal error) although the analysis pins the node and nothing of it changes
    text = ('<ir_version: 4, opset_import: ["" : 9]>\n'
            'g (float[N,3,8,8] x, int64[K] s) => (float[N,8,8,8] y, float[] t) {\n'
            '  h = Conv <pads=[1,1,1,1]> (x, W1, B1)\n  r = Relu (h)\n  y = Conv (r, W2, B2)\n'
            '  z = Reshape (x, s)\n  t = ReduceSum <keepdims=0> (z)\n}')
    model = onnx.parser.parse_model(text)
    model.graph.output[1].type.tensor_type.shape.SetInParent()  # a scalar (the parser leaves no shape)
    rng = np.random.default_rng(0)
    for name, shape in {"W1": (16, 3, 3, 3), "B1": (16,), "W2": (8, 16, 1, 1), "B2": (8,)}.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(random_weight(rng, shape), name))
    onnx.checker.check_model(model, full_check=True)
    result = graphprune.prune(model, target_flops=TARGET, round_to=1)
    assert BAND[0] <= result.report["macs_ratio"] <= BAND[1]
    onnx.checker.check_model(result.model, full_check=True)
    w = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert w["W1"][0] == w["W2"][1] < 16
    import onnxruntime as ort
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    y, t = sess.run(None, {"x": x, "s": i64(2, -1)})
    assert y.shape == (2, 8, 8, 8) and np.isclose(t, x.sum(), rtol=1e-4)
