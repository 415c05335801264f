"""Upload through the real server; the plaintext marker must appear on no disk we can see."""
import os
import secrets
import tempfile
from pathlib import Path

import httpx


def contains(root: Path, marker: bytes) -> list[Path]:
    hits = []
    # os.walk skips what vanishes mid-walk: other processes share the temp directory.
    for folder, _, names in os.walk(root):
        for path in (Path(folder) / name for name in names):
            try:
                if path.is_file() and not path.is_symlink() and marker in path.read_bytes():
                    hits.append(path)
            except OSError:
                continue
    return hits


def test_uploaded_plaintext_never_touches_disk(real_portal):
    portal, temp = real_portal
    token = portal.issue_token("admin", "images:write", "images:download")
    marker = b"BERTH-MARKER-" + secrets.token_hex(16).encode()
    # Several MiB, the marker repeated on many pages and across chunk boundaries.
    page = marker + os.urandom(4096 - len(marker))
    data = page * 1500
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/octet-stream",
               "X-Berth-Name": "marker-image"}
    with httpx.Client(base_url=portal.url, timeout=60) as client:
        response = client.post("/api/v1/images/", content=data, headers=headers)
        assert response.status_code == 201, response.text
        image_id = response.json()["id"]
        download = client.get(f"/api/v1/images/{image_id}/content", headers=headers)
        assert download.content == data
    portal.stop()
    assert contains(Path(portal.env["BERTH_DATA_DIR"]), marker) == []
    assert contains(temp, marker) == []
    assert contains(Path(tempfile.gettempdir()), marker) == []
