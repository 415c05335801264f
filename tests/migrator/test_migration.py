"""migrator.migration: the pre-check the Migrate page shows before confirming."""
import pytest

from migrator import inventory, migration
from migrator.models import Guest, Host
from tests.migrator.conftest import GUEST, hello

pytestmark = pytest.mark.django_db


def test_precheck_says_when_source_and_destination_run_different_hypervisors(enrolled):
    for name, guests in (("hostb", [GUEST]), ("hostc", [])):
        inventory.connected(Host.objects.get(name=name), f"chan-{name}", hello(name, guests))
    guest = Guest.objects.get(uuid=GUEST["uuid"])
    checks = {name: (ok, detail) for name, ok, detail in
              migration.precheck(guest, Host.objects.get(name="hostc"))}
    assert checks["hypervisor"] == (True, "sim → sim")
    Host.objects.filter(name="hostc").update(driver="qemu")
    checks = {name: (ok, detail) for name, ok, detail in
              migration.precheck(guest, Host.objects.get(name="hostc"))}
    assert checks["hypervisor"] == (False, "sim → qemu")
