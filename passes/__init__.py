"""Built-in passes of the graphprune pipeline (installed as graphprune.passes)."""
from __future__ import annotations

from . import criteria_data  # noqa: F401  (registers bn-scale, wanda, flap, obs, obs-free)
from .allocate import AllocatePass, PrunePlan
from .analyze import AnalyzePass
from .cleanup import DeadNodeCleanupPass
from .compensate import COMPENSATE_MODES, CompensatePass, CompensationGuardPass
from .criteria import CRITERIA, criterion_names, register_criterion
from .normalize import NormalizePass
from .recover import RecoverPass
from .rewrite import RewritePass
from .score import ScoreContext, ScorePass
from .verify import VerifyPass

__all__ = ["NormalizePass", "AnalyzePass", "ScorePass", "ScoreContext", "AllocatePass", "RewritePass",
           "DeadNodeCleanupPass", "VerifyPass", "CompensatePass", "CompensationGuardPass", "COMPENSATE_MODES", "PrunePlan",
           "RecoverPass",
           "register_criterion", "criterion_names", "CRITERIA"]
