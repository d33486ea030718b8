"""Op rules: how each ONNX op relates the channels of its inputs and outputs."""
from __future__ import annotations

from .base import (_GLOBAL, FactorBlock, OpRule, OpRuleRegistry, RewriteContext, RuleContext, WeightLayout,
                   register_op_rule, rule_for)
from .attention import register_attention_rules
from .contrib import register_contrib_rules
from .costed import register_costed_rules
from .quant import register_quant_rules
from .recurrent import register_recurrent_rules
from .fill import register_fill_rules
from .llm import register_llm_rules
from .nbits import register_nbits_rules
from .norm import register_norm_rules
from .spatial import register_spatial_rules
from .rules import BROADCAST_OPS, UNARY_OPS, register_builtin_rules

__all__ = ["OpRule", "OpRuleRegistry", "RuleContext", "RewriteContext", "FactorBlock",
           "register_op_rule", "default_registry", "UNARY_OPS", "BROADCAST_OPS", "WeightLayout",
           "rule_for"]

register_builtin_rules(_GLOBAL)
register_contrib_rules(_GLOBAL)
register_costed_rules(_GLOBAL)
register_attention_rules(_GLOBAL)
register_quant_rules(_GLOBAL)
register_recurrent_rules(_GLOBAL)
register_fill_rules(_GLOBAL)
register_norm_rules(_GLOBAL)
register_spatial_rules(_GLOBAL)
register_llm_rules(_GLOBAL)
register_nbits_rules(_GLOBAL)


def default_registry() -> OpRuleRegistry:
    """A copy of the global registry (built-in rules plus any registered by the user)."""
    return _GLOBAL.copy()
