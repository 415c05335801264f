"""Setting up the demo: accounts whose passwords are generated once and kept under var/."""
import json
import os

from django.conf import settings
from django.contrib.auth import get_user_model

from portal import roles
from portal.accounts import create_user, generate_password

DEMO_ACCOUNTS = (("admin", roles.ADMIN), ("auditor", roles.AUDITOR))


def credentials_path():
    return settings.DATA_DIR / "demo-credentials.json"


def load_credentials():
    path = credentials_path()
    return json.loads(path.read_text()) if path.exists() else {}


def save_credentials(credentials):
    path = credentials_path()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(credentials, f, indent=2)
    os.chmod(path, 0o600)


def ensure_demo_accounts():
    """Create the demo admin and auditor once; return {username: password}.

    A password comes from BERTH_DEMO_<NAME>_PASSWORD when set, otherwise it is
    generated on first run and stored (0600) so later runs reuse it.
    """
    roles.ensure_groups()
    stored = load_credentials()
    User = get_user_model()
    for username, role in DEMO_ACCOUNTS:
        wanted = os.environ.get(f"BERTH_DEMO_{username.upper()}_PASSWORD")
        user = User.objects.filter(username=username).first()
        if user is None:
            password = wanted or stored.get(username) or generate_password()
            create_user(username, role, password)
            stored[username] = password
        elif wanted and not user.check_password(wanted):
            user.set_password(wanted)
            user.save(update_fields=["password"])
            stored[username] = wanted
    save_credentials(stored)
    return {name: stored.get(name, "(set elsewhere)") for name, _ in DEMO_ACCOUNTS}


# The article's set-up: hostb runs the guests, hostc is the migration target,
# both mount hosta's NFS export.
SHARED_STORAGE = "hosta:/xen-storage"
DEMO_HOSTS = (("hostb", 8002, ["hostc"]), ("hostc", 8003, ["hostb"]))
DEMO_GUESTS = [
    {"name": "debian_etch", "memory_mib": 128, "vcpus": 1,
     "kernel": "/boot/vmlinuz-2.6.16.38-xenU", "ip": "192.168.1.110", "storage": [],
     "workload": {"profile": "idle"}},
    {"name": "ubuntu_fuwa_nfs_domu", "memory_mib": 256, "vcpus": 1,
     "kernel": "/boot/vmlinuz-2.6.16.38-xenU", "ip": "192.168.1.111",
     "storage": [SHARED_STORAGE], "workload": {"profile": "web"}},
]


def demo_driver():
    """``BERTH_DEMO_DRIVER=qemu`` runs the demo hosts' guests as real QEMU
    processes (TCG) instead of simulated ones."""
    driver = os.environ.get("BERTH_DEMO_DRIVER", "sim").strip() or "sim"
    if driver not in ("sim", "qemu"):
        raise ValueError(f"BERTH_DEMO_DRIVER must be sim or qemu, not {driver!r}")
    return driver


def demo_guests(driver):
    if driver == "sim":
        return DEMO_GUESTS
    # QEMU boots no Xen kernel: without one its guests run a tiny halt loop.
    return [{k: v for k, v in g.items() if k != "kernel"} for g in DEMO_GUESTS]


def ensure_demo_hosts(portal_url):
    """Enrol hostb and hostc once, their bundles pointing at ``portal_url``
    (the address this demo serves); return their agent config paths."""
    import uuid

    from migrator.enrollment import HostSpec, bundle_dir, enroll, set_portal_url
    from migrator.models import Host

    driver = demo_driver()
    paths = []
    # Tests run demos side by side: they pick free relocation ports this way.
    ports = os.environ.get("BERTH_DEMO_RELOCATION_PORTS", "")
    custom = [int(p) for p in ports.split(",") if p.strip()]
    for index, (name, port, allow) in enumerate(DEMO_HOSTS):
        port = custom[index] if index < len(custom) else port
        config = bundle_dir(name) / "agent.toml"
        if not Host.objects.filter(name=name).exists() or not config.exists():
            Host.objects.filter(name=name).delete()  # a half-made earlier attempt
            guests = [{**g, "uuid": str(uuid.uuid4())} for g in demo_guests(driver)] \
                if name == "hostb" else []
            enroll(HostSpec(name=name, relocation_port=port, storage=[SHARED_STORAGE],
                            hosts_allow=allow, guests=guests, driver=driver),
                   portal_url=portal_url)
        else:
            # Set up earlier for another address: the agents must follow the portal.
            set_portal_url(name, portal_url)
        paths.append(config)
    return paths
