"""manage.py hosts enroll NAME … | revoke NAME | list"""
from django.core.management.base import BaseCommand, CommandError

from migrator.enrollment import EnrollmentError, HostSpec, enroll, revoke
from migrator.models import Host


def _csv(value):
    return [item.strip() for item in value.split(",") if item.strip()]


class Command(BaseCommand):
    help = "Enrol hosts (credential, certificate, agent config bundle) and revoke them."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("enroll", help="enrol a host and write its agent bundle")
        add.add_argument("name")
        add.add_argument("--address", default="127.0.0.1", help="relocation address")
        add.add_argument("--relocation-port", type=int, default=8002)
        add.add_argument("--driver", default="sim")
        add.add_argument("--arch", default="x86_64")
        add.add_argument("--virt-extensions", type=_csv, default=["vmx"])
        add.add_argument("--memory-mib", type=int, default=4096)
        add.add_argument("--disk-gib", type=int, default=100)
        add.add_argument("--subnet", default="192.168.1.0/24")
        add.add_argument("--storage", type=_csv, default=[], help="comma-separated mounts")
        # Once per pattern: a regular expression may hold a comma (host{1,3}).
        add.add_argument("--hosts-allow", action="append", default=[], metavar="PATTERN",
                         help="a regular expression of peers allowed to migrate guests "
                              "here; repeat the option for each pattern")
        add.add_argument("--portal-url", help="URL agents use to reach the portal")
        rev = sub.add_parser("revoke", help="cut a host off: credential and certificate")
        rev.add_argument("name")
        sub.add_parser("list", help="list hosts")

    def handle(self, *args, action, **options):
        try:
            getattr(self, f"do_{action}")(**options)
        except EnrollmentError as exc:
            raise CommandError(str(exc)) from None

    def do_enroll(self, name, address, relocation_port, driver, arch, virt_extensions,
                  memory_mib, disk_gib, subnet, storage, hosts_allow, portal_url, **_):
        if not 0 < relocation_port < 65536:
            raise CommandError("--relocation-port must be between 1 and 65535")
        if memory_mib <= 0:
            raise CommandError("--memory-mib must be positive")
        spec = HostSpec(name=name, address=address, relocation_port=relocation_port,
                        driver=driver, arch=arch, virt_extensions=virt_extensions,
                        memory_mib=memory_mib, disk_gib=disk_gib, subnet=subnet,
                        storage=storage, hosts_allow=hosts_allow)
        path = enroll(spec, portal_url=portal_url)
        self.stdout.write(f"enrolled {name}; agent config: {path}")
        self.stdout.write(f"start its agent with: python manage.py relocationd --config {path}")

    def do_revoke(self, name, **_):
        revoke(name)
        self.stdout.write(f"revoked {name}: its credential and certificate no longer work")

    def do_list(self, **_):
        for host in Host.objects.all():
            state = "revoked" if host.revoked else ("online" if host.online else "offline")
            self.stdout.write(f"{host.name}\t{state}\t{host.address}:{host.relocation_port}\t"
                              f"{host.free_mib}/{host.memory_mib} MiB free")
