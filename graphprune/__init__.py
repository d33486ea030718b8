"""graphprune: structured pruning of ONNX graphs (dependency groups, physical rewrite, verified)."""
from __future__ import annotations

from .api import AnalysisResult, PruneResult, analysis_pipeline, analyze, default_pipeline, prune, recover
from .dependency import ChannelGroup, DependencyGraph, GroupMember, set_default_registry
from .errors import BadInputError, GraphpruneError, NothingToPruneError, PassError
from .oprules import OpRule, OpRuleRegistry, RuleContext, RewriteContext, default_registry, register_op_rule
from .passes import register_criterion, criterion_names
from .pipeline import Pass, PassManager, PassResult, PruneContext
# graphprune.plan is the function below; `from graphprune.plan import ...` still reaches the module
from .plan import apply_plan_to_torch, plan, plan_from_result

set_default_registry(default_registry)  # the analysis layer does not import the op rules above it

__version__ = "0.1.0"

__all__ = [
    "prune", "recover", "analyze", "PruneResult", "AnalysisResult", "default_pipeline", "analysis_pipeline",
    "ChannelGroup", "GroupMember", "DependencyGraph", "OpRule", "OpRuleRegistry", "RuleContext", "RewriteContext",
    "default_registry", "register_op_rule", "register_criterion", "criterion_names", "Pass", "PassManager",
    "PassResult", "PruneContext", "plan", "plan_from_result", "apply_plan_to_torch",
    "GraphpruneError", "BadInputError", "NothingToPruneError", "PassError",
]
