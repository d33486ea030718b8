"""Roles a weight axis plays in a channel group (analysis layer): the one home of their names.

An op rule tags a weight's axes with a role (`RuleContext.role`); the dependency graph keeps
it on each `GroupMember`; criteria, the oracle, the CLI's analysis listing and latency tables
select members by it.
"""
from __future__ import annotations

__all__ = ["ROLE_OUT", "ROLE_REDUCE", "ROLE_PARAM", "WEIGHT_ROLES"]

ROLE_OUT = "out"          # a producer's output rows (Conv W axis 0, Gemm output columns)
ROLE_REDUCE = "reduce"    # a consumer's reduced axis (Conv W axis 1): zeroed by the oracle
ROLE_PARAM = "param"      # per-channel parameters (bias, BN, broadcast constants)
WEIGHT_ROLES = (ROLE_OUT, ROLE_REDUCE)  # the axes of a weight matrix proper (not per-channel parameters)
