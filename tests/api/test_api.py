"""The Python API: prune/analyze over paths and ModelProtos, metadata kept, dynamic batch,
and the three extension points (op rule, criterion, pass) used without editing the package."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

try:
    from _fixtures import custom_act_model, custom_relu_rule, resnet_onnx  # noqa: F401
except ModuleNotFoundError:  # tests/ imported as a package
    from tests._fixtures import custom_act_model, custom_relu_rule, resnet_onnx  # noqa: F401

import graphprune
from graphprune import Pass, PassResult
from graphprune.passes import criteria as criteria_module
from graphprune.passes.analyze import protect_nodes


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def _run(model: onnx.ModelProto, batch: int) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def resnet_proto(resnet_onnx) -> onnx.ModelProto:
    return onnx.load(resnet_onnx)


# --------------------------------------------------------------------------- inputs


def test_prune_accepts_path_pathlike_and_proto_alike(resnet_onnx, resnet_proto):
    results = [graphprune.prune(src, 0.5) for src in (str(resnet_onnx), Path(resnet_onnx), resnet_proto)]
    first = _bytes(results[0].model)
    assert all(_bytes(r.model) == first for r in results[1:])
    assert all(isinstance(r, graphprune.PruneResult) for r in results)
    assert results[0].report["macs_after"] < results[0].report["macs_before"]


def test_prune_does_not_mutate_the_proto(resnet_proto):
    before = _bytes(resnet_proto)
    result = graphprune.prune(resnet_proto, 0.5, verify=True)
    assert _bytes(resnet_proto) == before
    assert result.model is not resnet_proto
    # and the result is independent of the input: editing one leaves the other alone
    result.model.graph.initializer[0].name = "changed"
    assert _bytes(resnet_proto) == before


def test_analyze_accepts_path_and_proto_without_mutating(resnet_onnx, resnet_proto):
    before = _bytes(resnet_proto)
    from_path = graphprune.analyze(str(resnet_onnx))
    from_proto = graphprune.analyze(resnet_proto)
    assert _bytes(resnet_proto) == before
    assert isinstance(from_proto, graphprune.AnalysisResult)
    assert from_path.to_dict() == from_proto.to_dict()
    assert len(from_proto.groups) > 0
    assert [g.name for g in from_path.groups] == [g.name for g in from_proto.groups]


def test_prune_rejects_bad_arguments(resnet_proto):
    for kwargs in ({}, {"target_flops": 0}, {"target_flops": 1.5}, {"target_flops": "abc"},
                   {"target_params": -1}, {"target_flops": 0.5, "round_to": 0},
                   {"target_flops": 0.5, "criterion": "nope"}, {"target_flops": 0.5, "protect": ["no_such_node"]}):
        with pytest.raises(graphprune.BadInputError):
            graphprune.prune(resnet_proto, **kwargs)


# --------------------------------------------------------------------------- metadata and batch


@pytest.mark.parametrize("ir_version", [8, 9])
def test_output_keeps_ir_version_and_opset_imports(ir_version, resnet_proto, tmp_path):
    model = onnx.ModelProto()
    model.CopyFrom(resnet_proto)
    model.ir_version = ir_version
    model.opset_import.append(helper.make_opsetid("com.example.unused", 3))
    model.producer_name = "test-producer"
    helper.set_model_props(model, {"origin": "test_api"})
    result = graphprune.prune(model, 0.5)
    opsets = lambda m: sorted((o.domain, o.version) for o in m.opset_import)  # noqa: E731
    assert result.model.ir_version == ir_version
    assert opsets(result.model) == opsets(model)
    assert result.model.producer_name == "test-producer"
    assert {p.key: p.value for p in result.model.metadata_props} == {"origin": "test_api"}
    saved = onnx.load(result.save(tmp_path / "out.onnx"))
    assert saved.ir_version == ir_version and opsets(saved) == opsets(model)
    onnx.checker.check_model(saved, full_check=True)


def test_dynamic_batch_stays_dynamic(resnet_proto):
    result = graphprune.prune(resnet_proto, 0.5)
    for vi in (*result.model.graph.input, *result.model.graph.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        assert d0.dim_param and not d0.HasField("dim_value"), f"{vi.name} lost its dynamic batch axis"
    for batch in (1, 7):
        y = _run(result.model, batch)
        assert y.shape == (batch, 10) and np.isfinite(y).all()
    # the pruned model still computes per-sample: batch 7's first row equals a batch-1 run of that row
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"input": x})[0][:1], sess.run(None, {"input": x[:1]})[0],
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- extension point 1: op rules


def test_custom_domain_op_rule_makes_a_group():
    model = custom_act_model()
    without = graphprune.analyze(model)
    assert without.groups == []
    pinned = {(p.tensor, p.axis): p for p in without.pinned}
    assert "no op rule for custom::MyRelu" in pinned[("w1", 0)].reason
    assert pinned[("w1", 0)].count == 16

    reg = graphprune.default_registry()
    graphprune.register_op_rule("MyRelu", custom_relu_rule, domain="custom", registry=reg)
    with_rule = graphprune.analyze(model, registry=reg)
    assert len(with_rule.groups) == 1
    group = with_rule.groups[0]
    assert group.size == 16
    members = {(m.tensor, m.axis): m.role for m in group.members}
    assert members[("w1", 0)] == "out" and members[("w2", 1)] == "reduce"
    assert ("h", 1) in members and ("a", 1) in members
    assert ("w1", 0) not in {(p.tensor, p.axis) for p in with_rule.pinned}

    # registered with registry=: nothing leaks into the defaults or into later runs
    assert graphprune.default_registry().lookup("custom", "MyRelu", 17) is None
    assert reg.lookup("custom", "MyRelu", 17) is not None
    assert graphprune.analyze(model).groups == []
    # a rule for another domain's op of the same name does not match
    assert reg.lookup("", "MyRelu", 17) is None


def test_custom_op_rule_prune_uses_local_registry():
    model = custom_act_model()
    with pytest.raises(graphprune.NothingToPruneError):
        graphprune.prune(model, 0.5)
    reg = graphprune.default_registry()
    graphprune.register_op_rule("MyRelu", custom_relu_rule, domain="custom", registry=reg)
    result = graphprune.prune(model, 0.5, registry=reg, round_to=1)
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert shapes["w1"] == (8, 4, 3, 3) and shapes["w2"] == (8, 8, 3, 3)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "MyRelu", "Conv"]
    assert result.model.graph.node[1].domain == "custom"


def test_custom_op_prune_keeps_shapes_and_counts_macs():
    model = custom_act_model()
    reg = graphprune.default_registry()
    graphprune.register_op_rule("MyRelu", custom_relu_rule, domain="custom", registry=reg)
    result = graphprune.prune(model, 0.5, registry=reg, round_to=1)
    assert 0.5 - 0.02 <= result.report["macs_ratio"] <= 0.5
    vi = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
          for v in result.model.graph.value_info}
    assert vi.get("a") == ["N", 8, 8, 8]


# --------------------------------------------------------------------------- extension point 2: criteria


@pytest.fixture
def highest_index_criterion():
    """Registers "mine" (keep the highest channel indices) and removes it afterwards."""
    calls = []

    def keep_highest(group, sctx):
        calls.append(group.id)
        return np.arange(group.size, dtype=np.float64)

    graphprune.register_criterion("mine", keep_highest)
    yield calls
    criteria_module.CRITERIA.pop("mine", None)


def test_registered_criterion_is_called(highest_index_criterion, resnet_proto):
    assert "mine" in graphprune.criterion_names()
    result = graphprune.prune(resnet_proto, 0.6, criterion="mine", round_to=1)
    groups = result.report["groups"]
    assert sorted(highest_index_criterion) == [g["id"] for g in groups]
    pruned = [g for g in groups if g["removed"]]
    assert len(pruned) >= 2
    for g in pruned:  # the lowest indices go, the highest stay
        assert g["removed"] == list(range(len(g["removed"]))), g
    # and the weights agree: the first conv keeps its last output channels
    original = {t.name: numpy_helper.to_array(t) for t in resnet_proto.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    first = groups[0]
    root = next(m for m in first["members"] if f"{m['tensor']}[{m['axis']}]" == first["name"])
    if first["removed"] and original[root["tensor"]].shape[1] == new[root["tensor"]].shape[1]:
        np.testing.assert_array_equal(new[root["tensor"]], original[root["tensor"]][len(first["removed"]):])


def test_registered_criterion_is_a_cli_choice(highest_index_criterion):
    from graphprune.cli import build_parser

    action = next(a for a in build_parser()._actions if "--criterion" in a.option_strings)
    assert "mine" in action.choices


def test_criterion_returning_wrong_length_is_an_error(resnet_proto):
    @graphprune.register_criterion("short")
    def one_short(group, sctx):
        return np.ones(group.size - 1)

    try:
        with pytest.raises(graphprune.PassError, match="score"):
            graphprune.prune(resnet_proto, 0.5, criterion="short")
    finally:
        criteria_module.CRITERIA.pop("short", None)


# --------------------------------------------------------------------------- extension point 3: passes


class ProtectMatching(Pass):
    """Protect every group touching a node whose name matches a glob pattern."""

    name = "protect_matching"
    requires = ("groups",)

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.protected: set[int] = set()

    def call(self, ctx):
        self.protected = protect_nodes(ctx, [self.pattern])
        return PassResult(info={"protected": sorted(self.protected)})


class RecordGroupSizes(Pass):
    name = "record_group_sizes"
    requires = ("groups",)

    def __init__(self):
        self.sizes: dict[int, int] | None = None

    def call(self, ctx):
        self.sizes = {g.id: g.size for g in ctx.groups}
        ctx.report["group_sizes"] = dict(self.sizes)
        return PassResult()


def test_user_passes_in_the_pipeline(resnet_proto):
    pipeline = graphprune.default_pipeline()
    protect, record = ProtectMatching("/4/*"), RecordGroupSizes()
    pipeline.insert_after("analyze", protect)
    pipeline.insert_after("protect_matching", record)
    names = [p.name for p in pipeline.passes]
    assert names.index("analyze") < names.index("protect_matching") < names.index("record_group_sizes") \
        < names.index("score")
    assert "protect_matching" not in [p.name for p in graphprune.default_pipeline().passes]

    result = graphprune.prune(resnet_proto, 0.7, pipeline=pipeline, round_to=1)
    groups = {g["id"]: g for g in result.report["groups"]}

    # the protect pass took effect: every group touching /4/* is untouched, the rest still prunes
    touching = {gid for gid, g in groups.items() if any(fnmatch.fnmatchcase(n, "/4/*") for n in g["nodes"])}
    assert touching and protect.protected == touching
    assert all(groups[gid]["protected"] and not groups[gid]["removed"] for gid in touching)
    assert any(g["removed"] for gid, g in groups.items() if gid not in touching)
    assert result.report["macs_ratio"] <= 0.7
    old = {t.name: tuple(t.dims) for t in resnet_proto.graph.initializer}
    new = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    for node in result.model.graph.node:
        if node.op_type == "Conv" and node.name.startswith("/4/"):
            assert new[node.input[1]] == old[node.input[1]], node.name

    # the recording pass saw every group, with the sizes the report gives
    assert record.sizes == {gid: g["channels"] for gid, g in groups.items()}
    assert result.report["group_sizes"] == record.sizes
    assert "protect_matching" in result.report["timings"] and "record_group_sizes" in result.report["timings"]


def test_pipeline_errors_name_the_pass(resnet_proto):
    class Broken(Pass):
        name = "broken"

        def call(self, ctx):
            raise RuntimeError("boom")

    pipeline = graphprune.default_pipeline()
    pipeline.insert_before("score", Broken())
    with pytest.raises(graphprune.PassError, match=r"'broken'.*normalize, analyze.*boom"):
        graphprune.prune(resnet_proto, 0.5, pipeline=pipeline)
    with pytest.raises(KeyError):
        pipeline.insert_after("no_such_pass", Broken())
