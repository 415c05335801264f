"""Channels' WebsocketCommunicator without importing daphne.

``channels.testing/__init__`` imports the live-server helpers, which need
daphne; we serve with uvicorn and do not install daphne. Registering the
package without running its ``__init__`` lets us import the communicator alone.
"""
import os
import sys
import types

import channels

if "channels.testing" not in sys.modules:
    package = types.ModuleType("channels.testing")
    package.__path__ = [os.path.join(os.path.dirname(channels.__file__), "testing")]
    sys.modules["channels.testing"] = package

from channels.testing.websocket import WebsocketCommunicator  # noqa: E402

__all__ = ["WebsocketCommunicator"]
