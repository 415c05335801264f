#!/usr/bin/env bash
# Build the real Linux test guest (Debian's kernel + a busybox initramfs) into
# $BERTH_GUEST_IMAGE_DIR or var/guest-image/; idempotent. See tests/support/guest_image.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m tests.support.guest_image "$@"
