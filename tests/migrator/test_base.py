"""The checks every driver applies: UUIDs, guest shapes, host compatibility."""

import pytest

from migrator.hypervisor import HostInfo, IncompatibleHost, InvalidRequest
from migrator.hypervisor.base import MAX_VCPUS, check_shape, norm_uuid


def test_a_uuid_is_normalised_or_refused():
    assert norm_uuid("AAAAAAAA000000000000000000000001") == "aaaaaaaa-0000-0000-0000-000000000001"
    with pytest.raises(InvalidRequest, match="invalid guest UUID 'x'"):
        norm_uuid("x")


@pytest.mark.parametrize(("name", "memory_mib", "vcpus", "message"), [
    ("", 8, 1, "guest name must be 1..255 characters"),
    ("g" * 256, 8, 1, "guest name must be 1..255 characters"),
    ("g", 0, 1, r"memory_mib must be an integer in 1..1048576"),
    ("g", True, 1, r"memory_mib must be an integer"),
    ("g", 8, MAX_VCPUS + 1, rf"vcpus must be an integer in 1..{MAX_VCPUS}"),
    ("g", 8, 1.0, "vcpus must be an integer"),
])
def test_a_guest_shape_out_of_bounds_is_refused(name, memory_mib, vcpus, message):
    with pytest.raises(InvalidRequest, match=message):
        check_shape(name, memory_mib, vcpus)


def test_a_guest_shape_within_bounds_passes():
    check_shape("g" * 255, 1 << 20, MAX_VCPUS)


def test_an_image_from_another_architecture_or_extensions_is_refused():
    host = HostInfo("h1", "test", "x86_64", ("vmx",), 64)
    host.check_compatible("x86_64", ["vmx"])
    with pytest.raises(IncompatibleHost, match="image needs x86_64 with svm extensions; "
                                               "host h1 is x86_64 with vmx"):
        host.check_compatible("x86_64", ("svm",))
    with pytest.raises(IncompatibleHost, match="image needs aarch64 with no extensions"):
        host.check_compatible("aarch64", ())
