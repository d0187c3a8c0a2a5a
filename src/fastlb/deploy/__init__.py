"""Deployments: rolling updates (drain/wait), canary rollouts with gates, blue-green switches.

waits.py      client-side waits on a running fastlb (drain --wait, wait --healthy)
rolling.py    scripts/rolling-update: replace each backend of a pool in turn
rollout.py    the rollout state machine (pure: clock and counters are given to it)
gates.py      the judgements: per-pool counter deltas against thresholds, external --check
engine.py     the rollouts inside the control process (asyncio task, splits, state file)
requests.py   the control-socket requests of the deployment commands (engine.py hands them over)
cli.py        the click commands (drain --wait, wait, rollout, switch)
"""


class DeployError(Exception):
    """A deployment request that cannot be done; str() is the one-line reason.  Here, not in
    engine.py, so that requests.py (which engine.py imports) needs nothing of the engine."""
