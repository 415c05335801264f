"""Signals other apps listen to, so the vault never imports them."""
from django.dispatch import Signal

# Sent before an upload's body is read: (request, meta), meta from its X-Berth-* headers.
# A receiver may return the metadata the image must carry instead (e.g. a job's record,
# when a job credential uploads), or raise StoreRefused: nothing is then read or stored.
upload_started = Signal()
# Sent inside the transaction that registers a newly stored image: (image, request).
# A receiver may raise StoreRefused: the row and the object are then undone.
image_stored = Signal()
# Sent when a download's first byte is about to be sent: (image, request).
image_download_started = Signal()


class StoreRefused(Exception):
    """An upload refused, with its HTTP status, error code and detail. A receiver of
    ``image_stored`` raises it to refuse the image (e.g. its job is over)."""

    def __init__(self, status, error, detail):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail
