"""The agent's TOML config: the enrollment shape parses; every mistake is one line."""
import copy
from pathlib import Path

import pytest

from migrator.agent import ConfigError, load_config, parse_config
from migrator.hypervisor import GuestSpec, SimDriver

EXAMPLE = '''
[host]
name = "hostb"
driver = "sim"
arch = "x86_64"
virt_extensions = ["vmx"]
memory_mib = 4096
disk_gib = 100
subnet = "192.168.1.0/24"
storage = ["hosta:/xen-storage"]
state_dir = "/abs/path/var/agents/hostb"
[portal]
url = "http://127.0.0.1:8000"
credential = "hc_secret-value"
ca = ""
[relocation]
address = "127.0.0.1"
port = 8002
hosts_allow = ["hostc"]
cert = "/abs/cert.pem"
key = "/abs/key.pem"
ca = "/abs/ca.pem"
[[guests]]
name = "debian_etch"
memory_mib = 128
vcpus = 1
uuid = "6f1c2b1e-8a4d-4c5e-9f00-0123456789ab"
kernel = "/boot/vmlinuz-2.6.16.38-xenU"
ip = "192.168.1.110"
storage = []
workload = { profile = "idle" }
[[guests]]
name = "ubuntu_fuwa"
memory_mib = 16
workload = { profile = "web", rate = 2000, hot_pages = 512 }
'''


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(EXAMPLE)
    return path


def test_the_enrollment_shape_parses(example):
    config = load_config(example)
    assert config.host.name == "hostb" and config.host.virt_extensions == ("vmx",)
    assert config.host.state_dir == Path("/abs/path/var/agents/hostb")
    assert config.portal.ws_url == "ws://127.0.0.1:8000/ws/agent/"
    assert config.relocation.port == 8002 and config.relocation.hosts_allow == ("hostc",)
    etch, fuwa = config.guests
    assert etch.uuid == "6f1c2b1e-8a4d-4c5e-9f00-0123456789ab" and fuwa.uuid is None
    assert etch.driver_config() == {"kernel": "/boot/vmlinuz-2.6.16.38-xenU",
                                    "ip": "192.168.1.110", "storage": [],
                                    "workload": {"profile": "idle"}}
    # hot_pages becomes the driver's hot_fraction (512 of 16 MiB = 4096 pages).
    assert fuwa.workload == {"profile": "web", "rate": 2000, "hot_fraction": 0.125}
    assert config.source == str(example)


def test_guest_config_is_what_the_sim_driver_accepts(example):
    config = load_config(example)
    driver = SimDriver("hostb", 64)
    try:
        fuwa = config.guests[1]
        info = driver.create(GuestSpec(fuwa.name, fuwa.memory_mib, fuwa.vcpus,
                                       fuwa.driver_config(), start=False))
        assert info.config["workload"]["hot_fraction"] == 0.125
    finally:
        driver.close()


def test_the_credential_is_not_in_reprs(example):
    config = load_config(example)
    assert "hc_secret-value" not in repr(config) and "hc_secret-value" not in str(config)


@pytest.mark.parametrize(("url", "ws_url"), [
    ("https://berth.example.org", "wss://berth.example.org/ws/agent/"),
    ("https://berth.example.org/prefix/", "wss://berth.example.org/prefix/ws/agent/"),
    ("http://[::1]:8000", "ws://[::1]:8000/ws/agent/"),
])
def test_ws_url_is_derived_from_the_portal_url(example, url, ws_url):
    data = _data(example)
    data["portal"]["url"] = url
    assert parse_config(data).portal.ws_url == ws_url


def test_qemu_guest_keys_reach_the_driver_config(example):
    data = _data(example)
    data["guests"][0].update(machine="q35", loader=[{"addr": 4096, "data": 7}])
    etch = parse_config(data).guests[0]
    assert etch.driver_config()["machine"] == "q35"
    assert etch.driver_config()["loader"] == [{"addr": 4096, "data": 7}]


def test_the_documented_kernel_initrd_append_guest_parses_on_a_qemu_host(example, tmp_path):
    """docs/qemu.md's guest: the agent refused it (config.initrd needs config.kernel)."""
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    data = _data(example)
    data["host"]["driver"] = "qemu"
    data["guests"] = [{"name": "web-1", "memory_mib": 128, "kernel": str(kernel),
                       "initrd": str(initrd), "append": "console=ttyS0"}]
    web = parse_config(data).guests[0]
    assert {k: web.driver_config()[k] for k in ("kernel", "initrd", "append")} == {
        "kernel": str(kernel), "initrd": str(initrd), "append": "console=ttyS0"}
    # ...and is still checked as QEMU will check it.
    data["guests"][0]["kernel"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"^guests\[0\]: config.kernel: .* is not a file"):
        parse_config(data)
    del data["guests"][0]["kernel"]
    with pytest.raises(ConfigError, match=r"^guests\[0\]: config.initrd needs config.kernel"):
        parse_config(data)


def test_a_sim_hosts_kernel_is_a_label_even_beside_an_initrd(example, tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"i")
    data = _data(example)
    data["guests"][0]["initrd"] = str(initrd)  # its kernel is the Xen label, no file here
    assert parse_config(data).guests[0].driver_config()["initrd"] == str(initrd)


def _data(example):
    import tomllib
    return tomllib.loads(example.read_text())


def _set(data, dotted, value):
    *path, last = dotted.split(".")
    node = data
    for key in path:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


DELETE = object()


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("host.name", DELETE, "host.name: required key is missing"),
    ("host.name", "bad name!", "host.name: 'bad name!' is not a valid host name"),
    ("host.driver", "xen", "host.driver: unknown driver 'xen' (known: sim, qemu)"),
    ("host.memory_mib", "4096", "host.memory_mib: must be an integer"),
    ("host.memory_mib", 0, "host.memory_mib: 0 is out of range (>= 1)"),
    ("host.subnet", "192.168.1.0/33", "host.subnet: '192.168.1.0/33' is not a network"),
    ("host.state_dir", "var/agents", "host.state_dir: must be an absolute path"),
    ("host.virt_extensions", "vmx", "host.virt_extensions: must be an array"),
    ("host.colour", "blue", "host.colour: unknown key"),
    ("portal.url", "ftp://portal", "portal.url: 'ftp://portal' is not an http"),
    ("portal.credential", "", "portal.credential: must not be empty"),
    ("portal.ca", "/no/such/ca.pem", "portal.ca: CA file '/no/such/ca.pem' not found"),
    ("relocation.port", 70000, "relocation.port: 70000 is out of range (1..65535)"),
    ("relocation.handshake_timeout", 0, "relocation.handshake_timeout: 0 is out of range"),
    ("relocation.handshake_timeout", "5s", "relocation.handshake_timeout: must be a number"),
    ("relocation.max_connections", 0, "relocation.max_connections: 0 is out of range"),
    ("relocation.max_unauthenticated_per_address", 0,
     "relocation.max_unauthenticated_per_address: 0 is out of range"),
    ("guests.0.uuid", "not-a-uuid", "guests[0].uuid: 'not-a-uuid' is not a UUID"),
    ("guests.0.ip", "300.1.1.1", "guests[0].ip: '300.1.1.1' is not an IP address"),
    ("guests.0.vcpus", 65, "guests[0].vcpus: 65 is out of range (1..64)"),
    ("guests.0.workload", {"profile": "nosuch"}, "guests[0].workload: unknown workload"),
    ("guests.0.workload", {"profile": "web", "rate": -1}, "guests[0].workload: workload rate"),
    ("guests.1.name", "debian_etch", "guests[1].name: 'debian_etch' is used by another"),
    ("guests.1.memory_mib", DELETE, "guests[1].memory_mib: required key is missing"),
    ("guests.0.machine", "pc,accel=kvm", "guests[0]: config.machine 'pc,accel=kvm' is not"),
    ("guests.0.disk", "/no/such.img", "guests[0]: config.disk: /no/such.img is not a file"),
])
def test_validation_errors_are_one_line_naming_the_key(example, key, value, expected):
    data = copy.deepcopy(_data(example))
    _set(data, key, value)
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_missing_sections_and_bad_files(tmp_path, example):
    data = _data(example)
    del data["portal"]
    with pytest.raises(ConfigError, match=r"^\[portal\]: section is missing$"):
        parse_config(data)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[host\nname = 1")
    with pytest.raises(ConfigError) as caught:
        load_config(broken)
    assert str(caught.value).startswith(f"{broken}: not valid TOML") and "\n" not in str(
        caught.value)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(EXAMPLE.replace("memory_mib = 4096", 'memory_mib = "lots"'))
    with pytest.raises(ConfigError, match=r"wrong\.toml: host\.memory_mib: must be an integer"):
        load_config(wrong)


def test_optional_sections_default(example):
    data = _data(example)
    del data["relocation"], data["guests"]
    config = parse_config(data)
    assert config.relocation.port == 8002 and config.guests == ()
    # A stranger's handshake gets 5 s; 64 strangers, 8 from one address; 8 migrations.
    reloc = config.relocation
    assert (reloc.handshake_timeout, reloc.max_unauthenticated,
            reloc.max_unauthenticated_per_address, reloc.max_connections) == (5.0, 64, 8, 8)


def test_the_relocation_front_door_is_configurable(example):
    data = _data(example)
    data["relocation"] |= {"handshake_timeout": 2.5, "max_connections": 2,
                           "max_unauthenticated": 16, "max_unauthenticated_per_address": 4}
    reloc = parse_config(data).relocation
    assert (reloc.handshake_timeout, reloc.max_connections, reloc.max_unauthenticated,
            reloc.max_unauthenticated_per_address) == (2.5, 2, 16, 4)
