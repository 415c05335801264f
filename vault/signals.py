"""Signals other apps listen to, so the vault never imports them."""
from django.dispatch import Signal

# Sent inside the transaction that registers a newly stored image: (image, request).
image_stored = Signal()
# Sent when a download's first byte is about to be sent: (image, request).
image_download_started = Signal()
