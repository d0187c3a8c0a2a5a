"""The fastlb configuration: a TOML file read into frozen dataclasses, with every default and every check.

Contract: `load_config` / `parse_config` either return a fully validated `Config` or raise exactly one
`ConfigError` whose str() is one line, "FILE: dotted.key: problem in plain words".  Nothing else escapes
(no KeyError, no TypeError, no traceback for the operator).  Stdlib only: the CLI imports this without the
compiled data plane.

Limits come from the shared-memory layout (includes/shm_layout.h): names fit FLB_NAME_LEN with its NUL,
timeouts are stored as uint32 milliseconds, weights are 0..1000.
"""

from fastlb.config.loader import load_config, parse_config
from fastlb.config.model import (
    ALGORITHMS,
    Address,
    BackendConfig,
    Config,
    ConfigError,
    GlobalConfig,
    HealthCheckConfig,
    ListenerConfig,
    OutlierConfig,
    PoolConfig,
    RouteConfig,
    SplitTarget,
)
from fastlb.config.values import parse_address, parse_duration

__all__ = [
    "ALGORITHMS",
    "Address",
    "BackendConfig",
    "Config",
    "ConfigError",
    "GlobalConfig",
    "HealthCheckConfig",
    "ListenerConfig",
    "OutlierConfig",
    "PoolConfig",
    "RouteConfig",
    "SplitTarget",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
]
