"""Engine policies, found by name. Importing this package registers every built-in policy."""

from workers.policies import (  # noqa: F401  (registers)
    adaptive, edf, fcfs, larry, oracle, orca, priority, rtc, sa_slo, sage, slob)
from workers.policies.base import EnginePolicy, make_policy, policy_names, register

__all__ = ["EnginePolicy", "make_policy", "policy_names", "register"]
