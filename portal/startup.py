"""Housekeeping every portal process does once when it starts."""
import logging
import threading

log = logging.getLogger(__name__)


def _housekeeping():
    from portal.audit_anchor import start_timer
    from vault.maintenance import cleanup_at_startup

    try:
        cleanup_at_startup()
    except Exception:  # a portal that cannot clean up must still serve; say why
        log.exception("start-up vault cleanup failed")
    # Every portal process anchors the audit chain's head outside the database
    # (BERTH_AUDIT_ANCHOR_INTERVAL_SECONDS; 0 leaves it to a system timer).
    start_timer()


def run_startup_housekeeping():
    """Run in a thread and wait: uvicorn imports the app inside its event loop,
    where Django refuses synchronous database calls."""
    worker = threading.Thread(target=_housekeeping, name="berth-startup")
    worker.start()
    worker.join()
