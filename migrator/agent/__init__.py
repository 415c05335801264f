"""The host agent (``manage.py relocationd``): Django-free, runs on hosts.

`config` loads the TOML config, `agent` keeps the portal connection and runs
jobs, `jobs` holds the save and restore runners, `transfer` the streaming
HTTP client, `outbox` what the agent keeps on disk.  See ``docs/agent.md``.
"""

from .agent import AGENT_VERSION, PROTOCOL, Agent, Backoff, make_driver
from .config import AgentConfig, ConfigError, GuestConfig, load_config, parse_config
from .outbox import HostState, Outbox

__all__ = [
    "AGENT_VERSION", "PROTOCOL", "Agent", "AgentConfig", "Backoff", "ConfigError",
    "GuestConfig", "HostState", "Outbox", "load_config", "make_driver", "parse_config",
]
