"""Deployments: rolling updates (drain/wait), canary rollouts with gates, blue-green switches.

waits.py      client-side waits on a running fastlb (drain --wait, wait --healthy)
rolling.py    scripts/rolling-update: replace each backend of a pool in turn
rollout.py    the rollout state machine (pure: clock and counters are given to it)
gates.py      the judgements: per-pool counter deltas against thresholds, external --check
engine.py     the rollouts inside the control process (asyncio task, splits, state file)
cli.py        the click commands (drain --wait, wait, rollout, switch)
"""
