"""Shared test helpers: build small models from ONNX text, and the mask-equivalence oracle."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

import graphprune
from graphprune.dependency import DependencyGraph
from graphprune.runtime import run_model, synthetic_inputs
from graphprune.verify import check_mask_equivalence

__all__ = ["assert_oracle", "make_model", "random_weight", "ORACLE_RTOL", "rule_failures", "assert_no_rule_failure",
           "analyze_checked"]

ORACLE_RTOL = 1e-4
RULE_FAILED = ": rule failed ("  # the pin reason the analysis gives when an op rule raises


def rule_failures(result) -> list[str]:
    """Pin reasons saying an op rule raised, from a PruneResult / AnalysisResult / DependencyGraph."""
    dg = result if isinstance(result, DependencyGraph) else result.context.dependency
    return sorted({r for r in dg.dim_pin.values() if RULE_FAILED in r})


def assert_no_rule_failure(result) -> None:
    failures = rule_failures(result)
    assert not failures, "an op rule raised during analysis (its channels were pinned): " + "; ".join(failures[:3])


def analyze_checked(model, **kw) -> "graphprune.AnalysisResult":
    """graphprune.analyze that fails the test when a rule raised (a crash must not pass as 'no groups')."""
    res = graphprune.analyze(model, **kw)
    assert_no_rule_failure(res)
    return res


def pytest_configure(config):
    config.addinivalue_line("markers", "rule_failure_ok: the test expects an op rule to raise during analysis")


@pytest.fixture(autouse=True)
def _rule_failure_fails_the_test(monkeypatch, request):
    """Every analysis in a test: a rule that raises fails the test (unless marked rule_failure_ok)."""
    failures: list[str] = []
    pin = DependencyGraph.pin

    def recording_pin(self, dim, reason):
        if RULE_FAILED in reason:
            failures.append(reason)
        return pin(self, dim, reason)

    monkeypatch.setattr(DependencyGraph, "pin", recording_pin)
    yield failures
    if failures and request.node.get_closest_marker("rule_failure_ok") is None:
        pytest.fail("an op rule raised during analysis (its channels were pinned): " + "; ".join(
            sorted(set(failures))[:3]), pytrace=False)


def random_weight(rng: np.random.Generator, shape) -> np.ndarray:
    """Normal values scaled by 1/sqrt(fan-in), so activations stay O(1) through a few layers."""
    shape = tuple(int(s) for s in shape)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)


def make_model(text: str, weights: dict | None = None, seed: int = 0) -> onnx.ModelProto:
    """Parse ONNX text and add `weights` as initializers.

    A weight given as a shape gets seeded random float32 values; an ndarray is used as is.
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, spec in (weights or {}).items():
        arr = spec if isinstance(spec, np.ndarray) else random_weight(rng, spec)
        model.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    onnx.checker.check_model(model)
    return model


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(model))


def _has_dynamic_batch(model: onnx.ModelProto) -> bool:
    init = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            return True
    return False


def assert_oracle(model_proto_or_path, **prune_kwargs) -> "graphprune.PruneResult":
    """Prune with verify=True and check everything a pruned model must satisfy.

    - no op rule raised during the analysis (a crash is pinned, and would pass unseen);
    - the mask-equivalence oracle holds (report["oracle"]["equivalent"]);
    - onnx.checker passes with full shape inference;
    - something was actually removed;
    - with a dynamic batch, the pruned model runs at batch 1 and 7, its outputs have the
      original's shapes, and it still equals the masked original at batch 7.
    Returns the PruneResult.
    """
    if "target_flops" not in prune_kwargs and "target_params" not in prune_kwargs:
        prune_kwargs["target_flops"] = 0.6
    original = _load(model_proto_or_path)
    result = graphprune.prune(model_proto_or_path, verify=True, **prune_kwargs)
    assert_no_rule_failure(result)
    oracle = result.report["oracle"]
    assert oracle["equivalent"], f"mask-equivalence oracle failed: {oracle}"
    onnx.checker.check_model(result.model, full_check=True)
    assert any(g["removed"] for g in result.report["groups"]), "the plan removed nothing"
    if _has_dynamic_batch(original):
        ctx = result.context
        for batch in (1, 7):
            feeds = synthetic_inputs(original, batch=batch, seed=100 + batch)
            want = [o.shape for o in run_model(original, feeds)]
            got = run_model(result.model, feeds)
            assert [o.shape for o in got] == want, f"batch {batch}: output shapes {[o.shape for o in got]} != {want}"
            assert all(np.isfinite(o).all() for o in got if np.issubdtype(o.dtype, np.floating))
        b7 = check_mask_equivalence(ctx.original, result.model, ctx.dependency, ctx.plan, ctx.groups,
                                    batches=(7,), seed=7, rtol=ORACLE_RTOL)
        assert b7["equivalent"], f"mask-equivalence oracle failed at batch 7: {b7}"
    return result


@pytest.fixture
def oracle():
    """The :func:`assert_oracle` helper as a fixture."""
    return assert_oracle
