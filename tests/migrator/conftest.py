"""Portal-side migrator fixtures: an enrolled host with a live agent connection,
and the real Linux test guest."""
import shutil

import pytest

from migrator.enrollment import HostSpec, enroll
from migrator.models import Host
from portal.routing import websocket_application
from tests.support.channels_testing import WebsocketCommunicator
from tests.support.guest_image import BUILD_HINT, find_image, image_dir


@pytest.fixture
def portal_dirs(settings, tmp_path):
    settings.PKI_DIR = tmp_path / "pki"
    settings.AGENTS_DIR = tmp_path / "agents"
    settings.PORTAL_URL = "http://portal.test"
    return tmp_path


def credential_of(config_path):
    import tomllib

    return tomllib.loads(config_path.read_text())["portal"]["credential"]


@pytest.fixture
def enrolled(portal_dirs, db):
    """{name: credential} for two enrolled hosts."""
    out = {}
    for name in ("hostb", "hostc"):
        path = enroll(HostSpec(name=name, storage=["hosta:/xen-storage"], memory_mib=1024))
        out[name] = credential_of(path)
    return out


def agent_socket(credential):
    headers = [(b"authorization", f"Host {credential}".encode())] if credential else []
    return WebsocketCommunicator(websocket_application, "/ws/agent/", headers=headers)


GUEST = {"uuid": "7a1c0e8e-3b5c-4e0e-9a57-1f2d3c4b5a69", "name": "debian_etch",
         "domain_id": 1, "memory_mib": 128, "vcpus": 1, "state": "running", "active": True,
         "config": {"ip": "192.168.1.110", "workload": {"profile": "idle"}}}


def hello(name, guests=(GUEST,), **extra):
    return {"type": "hello", "protocol": 1, "host": name, "driver": "sim", "arch": "x86_64",
            "virt_extensions": ["vmx"], "subnet": "192.168.1.0/24",
            "storage": ["hosta:/xen-storage"],
            "capacity": {"memory_mib": 1024, "used_mib": 128, "reserved_mib": 0,
                         "disk_gib": 100},
            "guests": list(guests), "jobs": [], "results": [], **extra}


async def connect_agent(credential, name, guests=(GUEST,), **extra):
    socket = agent_socket(credential)
    connected, _ = await socket.connect()
    assert connected
    await socket.send_json_to(hello(name, guests, **extra))
    welcome = await socket.receive_json_from(timeout=5)
    assert welcome["type"] == "welcome"
    return socket


def host(name):
    return Host.objects.get(name=name)


@pytest.fixture(scope="session")
def real_guest():
    """Debian's kernel and the busybox initramfs (tests/support/guest_image.py)
    to boot under QEMU; skips, saying how to get them, where they are missing."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    image = find_image()
    if image is None:
        pytest.skip(f"the real Linux test guest is not built in {image_dir()}: "
                    f"run {BUILD_HINT}")
    return image
