"""``mae-timm compare`` on top of the evaluation layer: arms (a type), their budgets, the run, the report."""

from mae_timm.engine.eval.compare.arms import Arm, parse_arm, parse_arms
from mae_timm.engine.eval.compare.config import CompareConfig
from mae_timm.engine.eval.compare.run import run_compare

__all__ = ["Arm", "CompareConfig", "parse_arm", "parse_arms", "run_compare"]
