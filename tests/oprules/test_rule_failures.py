"""A rule that raises is pinned by the analysis (fail closed); the test helpers must not let that
pass unseen: a test asserting "no groups" would otherwise also pass on a crash."""
from __future__ import annotations

import pytest

import graphprune
from graphprune.oprules import default_registry, register_op_rule

from conftest import analyze_checked, assert_oracle, make_model, rule_failures

TEXT = '''<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  h = Conv <pads=[1,1,1,1]> (x, W1)
  r = Relu (h)
  m = Conv (r, W2)
  z = Sigmoid (m)
  y = Conv (z, W3)
}'''
WEIGHTS = {"W1": (8, 3, 3, 3), "W2": (6, 8, 1, 1), "W3": (4, 6, 1, 1)}


def _crashing_relu_registry():
    reg = default_registry()

    def boom(ctx):
        raise RuntimeError("boom")

    register_op_rule("Relu", boom, registry=reg)
    return reg


@pytest.mark.rule_failure_ok
def test_a_raising_rule_is_reported_by_the_helpers(_rule_failure_fails_the_test):
    model = make_model(TEXT, WEIGHTS)
    reg = _crashing_relu_registry()
    res = graphprune.analyze(model, registry=reg)
    assert [g.size for g in res.groups] == [6]  # the crash pinned the Relu's 8 channels ...
    assert any("Relu" in r and "boom" in r for r in rule_failures(res))  # ... and says so
    with pytest.raises(AssertionError, match="rule raised"):
        analyze_checked(model, registry=reg)
    with pytest.raises(AssertionError, match="rule raised"):
        assert_oracle(model, registry=reg, target_flops=0.9)
    # the autouse fixture saw it too: an unmarked test would fail at teardown
    assert any("boom" in r for r in _rule_failure_fails_the_test)


def test_without_a_crash_the_same_graph_has_a_group():
    model = make_model(TEXT, WEIGHTS)
    assert sorted(g.size for g in analyze_checked(model).groups) == [6, 8]
    assert rule_failures(graphprune.analyze(model)) == []
