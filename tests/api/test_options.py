"""One options object: PruneOptions holds every prune option's default, check and choices; the API
validates through it and the CLI's flags are built from it."""
from __future__ import annotations

import dataclasses

import pytest

import graphprune
from graphprune.cli import build_analyze_parser, build_parser
from graphprune.options import ANALYZE, PRUNE, PruneOptions


@pytest.fixture(scope="module")
def conv_proto():
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 16, 1, 1)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], [w, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_model_prunes_with_valid_options(conv_proto):
    r = graphprune.prune(conv_proto, target_flops=0.5, round_to=4, min_keep=0.25, verify=True)
    assert r.report["macs_after"] < r.report["macs_before"] and r.report["oracle"]["equivalent"]


def _actions(parser):
    return {a.dest: a for a in parser._actions}


@pytest.mark.parametrize("wrong, right", [("round_too", "round_to"), ("critrion", "criterion"),
                                          ("target_flop", "target_flops"), ("min_kep", "min_keep")])
def test_misspelt_option_names_the_closest_one(conv_proto, wrong, right):
    with pytest.raises(graphprune.BadInputError) as exc:
        graphprune.prune(conv_proto, target_flops=0.5, **{wrong: 1})
    msg = str(exc.value)
    assert "\n" not in msg and repr(wrong) in msg and repr(right) in msg


def test_unknown_option_without_close_match_lists_the_known_ones(conv_proto):
    with pytest.raises(graphprune.BadInputError, match="unknown option 'zzzz'.*round_to"):
        graphprune.prune(conv_proto, target_flops=0.5, zzzz=True)


@pytest.mark.parametrize("command, parser", [(PRUNE, build_parser), (ANALYZE, build_analyze_parser)])
def test_every_cli_option_comes_from_the_options_object(command, parser):
    actions = _actions(parser())
    shown = [f for f in dataclasses.fields(PruneOptions) if command in f.metadata["spec"].commands]
    assert shown, command
    for f in shown:
        a = actions[f.name]
        assert a.option_strings == ["--" + f.name.replace("_", "-")]
        default = PruneOptions.default(f.name)
        assert a.default == (list(default) if isinstance(default, tuple) else default), f.name
        allowed = f.metadata["spec"].allowed()
        if allowed is not None:
            assert tuple(a.choices) == allowed


def test_defaults_and_help_agree():
    actions = _actions(build_parser())
    assert actions["round_to"].default == PruneOptions.default("round_to") == PruneOptions().round_to
    assert f"(default: {PruneOptions.default('round_to')})" in actions["round_to"].help
    assert "{default}" not in " ".join(a.help or "" for a in actions.values())


@pytest.mark.parametrize("kwargs, pattern", [
    ({"target_flops": 0}, "target_flops"), ({"target_flops": float("nan")}, "target_flops"),
    ({"target_params": 1.5}, "target_params"), ({"round_to": 0}, "round_to"), ({"round_to": None}, "round_to"),
    ({"min_keep": -0.1}, "min_keep"), ({"criterion": "nope"}, "criterion"), ({"compensate": "all"}, "compensate"),
    ({"compensate_select": "loo"}, "compensate_select"), ({"compensate_damp": -1}, "compensate_damp"),
    ({"calib_samples": 0}, "calib_samples"),
])
def test_options_validate_once(kwargs, pattern):
    with pytest.raises(graphprune.BadInputError, match=pattern):
        PruneOptions.from_kwargs(**kwargs)


def test_registered_criterion_is_accepted():
    from graphprune.passes import CRITERIA

    graphprune.register_criterion("opt-test-crit", lambda group, sctx: None)
    try:
        assert PruneOptions.from_kwargs(criterion="opt-test-crit").criterion == "opt-test-crit"
        assert "opt-test-crit" in _actions(build_parser())["criterion"].choices
    finally:
        CRITERIA.pop("opt-test-crit")


def test_width_switches_become_the_policy():
    o = PruneOptions.from_kwargs(target_flops=0.5, head_dim=True, prune_kv_cache=True, policy={"factor_outer": True})
    assert o.context_options()["policy"] == {"factor_outer": True, "head_dim": True, "prune_kv_cache": True}


def test_bench_options_build_the_bench_and_prune_latency_groups():
    from graphprune.bench import BenchOptions, build_parser as build_bench_parser

    for parser in (build_bench_parser(), build_parser()):
        actions = _actions(parser)
        for f in dataclasses.fields(BenchOptions):
            a = actions[f.name]
            assert a.option_strings == ["--" + f.name]
            assert a.default == ([] if f.name == "shape" else f.default), f.name
    assert build_bench_parser().parse_args(["m.onnx", "--runs", "3"]).runs == 3
    with pytest.raises(SystemExit) as exc:
        build_bench_parser().parse_args(["m.onnx", "--runs", "0"])
    assert exc.value.code == 2
