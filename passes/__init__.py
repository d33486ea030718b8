"""Built-in passes of the graphprune pipeline (installed as graphprune.passes)."""
from __future__ import annotations

from .allocate import AllocatePass, PrunePlan
from .analyze import AnalyzePass
from .cleanup import DeadNodeCleanupPass
from .criteria import CRITERIA, criterion_names, register_criterion
from .normalize import NormalizePass
from .rewrite import RewritePass
from .score import ScorePass
from .verify import VerifyPass

__all__ = ["NormalizePass", "AnalyzePass", "ScorePass", "AllocatePass", "RewritePass", "DeadNodeCleanupPass",
           "VerifyPass", "PrunePlan", "register_criterion", "criterion_names", "CRITERIA"]
