"""The agent's TOML config file: loading and validation.

``manage.py hosts enroll`` writes the file; an operator may edit it.  Every
problem is reported as one `ConfigError` line that names the key, so a typo
stops the agent at start with a message instead of a traceback later.
Unknown keys are errors for the same reason.  The reference is in
``docs/agent.md``.

Django-free.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from migrator.hypervisor.base import MAX_VCPUS, PAGES_PER_MIB
from migrator.hypervisor.qemu_process import GUEST_KEYS as QEMU_GUEST_KEYS
from migrator.hypervisor.qemu_process import check_config
from migrator.hypervisor.workload import resolve_profile
from migrator.tls import compile_pattern

DRIVERS = ("sim", "qemu")
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ConfigError(ValueError):
    """One line saying which key is wrong and why."""


@dataclass(frozen=True)
class HostConfig:
    name: str
    driver: str
    arch: str
    virt_extensions: tuple[str, ...]
    memory_mib: int
    disk_gib: int
    subnet: str
    storage: tuple[str, ...]
    state_dir: Path


@dataclass(frozen=True)
class PortalConfig:
    url: str
    credential: str = field(repr=False)  # never in logs or reprs
    ca: str = ""

    @property
    def ws_url(self) -> str:
        """``http(s)://portal[/prefix]`` -> ``ws(s)://portal[/prefix]/ws/agent/``."""
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/agent/", "", ""))


@dataclass(frozen=True)
class RelocationConfig:
    address: str = "127.0.0.1"
    port: int = 8002
    hosts_allow: tuple[str, ...] = ()
    cert: str = ""
    key: str = ""
    ca: str = ""
    # The front door (docs/relocation-protocol.md, section 1): what a peer
    # without a certificate may hold, and the slots of authenticated ones.
    handshake_timeout: float = 5.0
    max_connections: int = 8
    max_unauthenticated: int = 64
    max_unauthenticated_per_address: int = 8


@dataclass(frozen=True)
class GuestConfig:
    name: str
    memory_mib: int
    vcpus: int = 1
    uuid: str | None = None
    kernel: str = ""
    ip: str = ""
    storage: tuple[str, ...] = ()
    workload: dict[str, Any] = field(default_factory=lambda: {"profile": "idle"})
    qemu: dict[str, Any] = field(default_factory=dict)  # QEMU driver keys (docs/qemu.md)

    def driver_config(self) -> dict[str, Any]:
        """The guest config as the driver stores and saves it."""
        return {"kernel": self.kernel, "ip": self.ip, "storage": list(self.storage),
                "workload": dict(self.workload), **self.qemu}


@dataclass(frozen=True)
class AgentConfig:
    host: HostConfig
    portal: PortalConfig
    relocation: RelocationConfig
    guests: tuple[GuestConfig, ...] = ()
    source: str = ""  # the file it came from, for messages


# --------------------------------------------------------------------------
def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate a config file; raises `ConfigError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_config(data, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(data: dict[str, Any], source: str = "") -> AgentConfig:
    """Validate an already-parsed TOML document."""
    _known(data, "", {"host", "portal", "relocation", "guests"})
    host = _host(_table(data, "host", required=True))
    portal = _portal(_table(data, "portal", required=True))
    relocation = _relocation(_table(data, "relocation", required=False))
    guests = data.get("guests", [])
    if not isinstance(guests, list) or not all(isinstance(g, dict) for g in guests):
        raise ConfigError("guests: must be an array of tables ([[guests]])")
    parsed = tuple(_guest(g, f"guests[{i}]", host.driver) for i, g in enumerate(guests))
    _unique(parsed)
    return AgentConfig(host, portal, relocation, parsed, source)


# -- sections -----------------------------------------------------------------
def _host(t: dict[str, Any]) -> HostConfig:
    _known(t, "host", {"name", "driver", "arch", "virt_extensions", "memory_mib",
                       "disk_gib", "subnet", "storage", "state_dir"})
    name = _str(t, "host.name", "name")
    if not HOST_NAME.match(name):
        raise ConfigError(f"host.name: {name!r} is not a valid host name "
                          "(letters, digits, '.', '_', '-'; at most 63)")
    driver = _str(t, "host.driver", "driver", default="sim")
    if driver not in DRIVERS:
        raise ConfigError(f"host.driver: unknown driver {driver!r} (known: {', '.join(DRIVERS)})")
    subnet = _str(t, "host.subnet", "subnet", default="")
    if subnet:
        try:
            subnet = str(ipaddress.ip_network(subnet, strict=False))
        except ValueError:
            raise ConfigError(f"host.subnet: {subnet!r} is not a network "
                              "like 192.168.1.0/24") from None
    state_dir = _str(t, "host.state_dir", "state_dir")
    if not os.path.isabs(state_dir):
        raise ConfigError(f"host.state_dir: must be an absolute path, not {state_dir!r}")
    return HostConfig(
        name=name, driver=driver, arch=_str(t, "host.arch", "arch", default="x86_64"),
        virt_extensions=_strs(t, "host.virt_extensions", "virt_extensions"),
        memory_mib=_int(t, "host.memory_mib", "memory_mib", low=1),
        disk_gib=_int(t, "host.disk_gib", "disk_gib", low=0, default=0),
        subnet=subnet, storage=_strs(t, "host.storage", "storage"),
        state_dir=Path(state_dir))


def _portal(t: dict[str, Any]) -> PortalConfig:
    _known(t, "portal", {"url", "credential", "ca"})
    url = _str(t, "portal.url", "url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"portal.url: {url!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ConfigError("portal.url: must not have a query or fragment")
    credential = _str(t, "portal.credential", "credential")
    if any(c.isspace() for c in credential):
        raise ConfigError("portal.credential: must not contain spaces")
    ca = _str(t, "portal.ca", "ca", default="")
    if ca and not os.path.isfile(ca):
        raise ConfigError(f"portal.ca: CA file {ca!r} not found")
    return PortalConfig(url.rstrip("/"), credential, ca)


def _relocation(t: dict[str, Any]) -> RelocationConfig:
    _known(t, "relocation", {"address", "port", "hosts_allow", "cert", "key", "ca",
                             "handshake_timeout", "max_connections", "max_unauthenticated",
                             "max_unauthenticated_per_address"})
    return RelocationConfig(
        address=_str(t, "relocation.address", "address", default="127.0.0.1"),
        port=_int(t, "relocation.port", "port", low=1, high=65535, default=8002),
        hosts_allow=_patterns(_strs(t, "relocation.hosts_allow", "hosts_allow")),
        cert=_str(t, "relocation.cert", "cert", default=""),
        key=_str(t, "relocation.key", "key", default=""),
        ca=_str(t, "relocation.ca", "ca", default=""),
        handshake_timeout=_seconds(t, "relocation.handshake_timeout", "handshake_timeout",
                                   high=60.0, default=5.0),
        max_connections=_int(t, "relocation.max_connections", "max_connections", low=1,
                             high=1024, default=8),
        max_unauthenticated=_int(t, "relocation.max_unauthenticated", "max_unauthenticated",
                                 low=1, high=65536, default=64),
        max_unauthenticated_per_address=_int(
            t, "relocation.max_unauthenticated_per_address",
            "max_unauthenticated_per_address", low=1, high=65536, default=8))


def _patterns(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in patterns:
        try:
            compile_pattern(pattern)
        except ValueError as exc:
            raise ConfigError(f"relocation.hosts_allow: {exc}") from None
    return patterns


def _guest(t: dict[str, Any], where: str, driver: str) -> GuestConfig:
    _known(t, where, {"name", "memory_mib", "vcpus", "uuid", "kernel", "ip", "storage",
                      "workload", *QEMU_GUEST_KEYS})
    name = _str(t, f"{where}.name", "name")
    if len(name) > 255:
        raise ConfigError(f"{where}.name: longer than 255 characters")
    memory_mib = _int(t, f"{where}.memory_mib", "memory_mib", low=1, high=1 << 20)
    uuid = _str(t, f"{where}.uuid", "uuid", default="") or None
    if uuid is not None:
        try:
            uuid = str(uuidlib.UUID(uuid))
        except ValueError:
            raise ConfigError(f"{where}.uuid: {uuid!r} is not a UUID") from None
    ip = _str(t, f"{where}.ip", "ip", default="")
    if ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"{where}.ip: {ip!r} is not an IP address") from None
    kernel = _str(t, f"{where}.kernel", "kernel", default="")
    return GuestConfig(
        name=name, memory_mib=memory_mib,
        vcpus=_int(t, f"{where}.vcpus", "vcpus", low=1, high=MAX_VCPUS, default=1),
        uuid=uuid, kernel=kernel, ip=ip,
        storage=_strs(t, f"{where}.storage", "storage"),
        workload=_workload(t.get("workload", {"profile": "idle"}), f"{where}.workload",
                           memory_mib),
        qemu=_qemu_keys(t, where, kernel, driver))


def _qemu_keys(t: dict[str, Any], where: str, kernel: str, driver: str) -> dict[str, Any]:
    """The QEMU driver's guest keys, checked as the driver will check them:
    with ``kernel``, which QEMU boots (``initrd`` and ``append`` need it).
    Other drivers take ``kernel`` as a label, not a file of this host."""
    keys = {k: t[k] for k in QEMU_GUEST_KEYS if k in t}
    if driver == "qemu":
        checked = {**keys, "kernel": kernel}
    else:
        checked = {k: v for k, v in keys.items() if not (k == "initrd" and kernel)}
    try:
        check_config(checked)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return keys


def _workload(value: Any, where: str, memory_mib: int) -> dict[str, Any]:
    """Accept ``hot_pages`` (what operators think in) and store the driver's
    ``hot_fraction``, so the config the guest carries is what the sim runs."""
    if isinstance(value, str):
        value = {"profile": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a profile name or a table")
    workload = dict(value)
    if "hot_pages" in workload:
        hot = workload.pop("hot_pages")
        if not isinstance(hot, int) or isinstance(hot, bool) or hot < 1:
            raise ConfigError(f"{where}.hot_pages: must be a positive integer")
        workload["hot_fraction"] = min(1.0, hot / (memory_mib * PAGES_PER_MIB))
    workload.setdefault("profile", "idle")
    try:
        resolve_profile(workload)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return workload


def _unique(guests: tuple[GuestConfig, ...]) -> None:
    for label, values in (("name", [g.name for g in guests]),
                          ("uuid", [g.uuid for g in guests if g.uuid])):
        seen: set[str] = set()
        for i, value in enumerate(values):
            if value in seen:
                raise ConfigError(f"guests[{i}].{label}: {value!r} is used by another guest")
            seen.add(value)


# -- typed getters ------------------------------------------------------------
_MISSING = object()


def _known(t: dict[str, Any], where: str, allowed: set[str]) -> None:
    for key in t:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"{name}: unknown key (known: {', '.join(sorted(allowed))})")


def _table(data: dict[str, Any], key: str, *, required: bool) -> dict[str, Any]:
    if key not in data:
        if required:
            raise ConfigError(f"[{key}]: section is missing")
        return {}
    if not isinstance(data[key], dict):
        raise ConfigError(f"{key}: must be a table ([{key}])")
    return data[key]


def _get(t: dict[str, Any], name: str, key: str, default: Any) -> Any:
    if key in t:
        return t[key]
    if default is _MISSING:
        raise ConfigError(f"{name}: required key is missing")
    return default


def _str(t: dict[str, Any], name: str, key: str, default: Any = _MISSING) -> str:
    value = _get(t, name, key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: must be a string")
    if default is _MISSING and not value.strip():
        raise ConfigError(f"{name}: must not be empty")
    return value.strip()


def _int(t: dict[str, Any], name: str, key: str, *, low: int, high: int | None = None,
         default: Any = _MISSING) -> int:
    value = _get(t, name, key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name}: must be an integer")
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name}: {value} is out of range ({bounds})")
    return value


def _seconds(t: dict[str, Any], name: str, key: str, *, high: float,
             default: Any = _MISSING) -> float:
    value = _get(t, name, key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{name}: must be a number of seconds")
    if not 0 < value <= high:
        raise ConfigError(f"{name}: {value} is out of range (0 < seconds <= {high:g})")
    return float(value)


def _strs(t: dict[str, Any], name: str, key: str) -> tuple[str, ...]:
    value = _get(t, name, key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{name}: must be an array of non-empty strings")
    return tuple(v.strip() for v in value)
