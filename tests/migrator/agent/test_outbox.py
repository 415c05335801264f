"""The outbox and the host state: atomic, private, survive a restart."""
import os
import stat

from migrator.agent import HostState, Outbox
from migrator.agent.outbox import ensure_state_dir


def result(job, state="succeeded"):
    return {"type": "job.result", "job": job, "state": state, "error": "", "result": {}}


def test_results_persist_until_acked(tmp_path):
    state = ensure_state_dir(tmp_path / "state")
    box = Outbox(state)
    box.add(result("a"))
    box.add(result("b", "failed"))
    box.add(result("a", "aborted"))  # the same job again replaces it
    assert stat.S_IMODE(os.stat(box.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    again = Outbox(state)
    assert [(r["job"], r["state"]) for r in again.pending()] == [("a", "aborted"),
                                                                 ("b", "failed")]
    assert again.ack("a") and not again.ack("a")
    assert [r["job"] for r in Outbox(state).pending()] == ["b"]
    assert [p.name for p in state.iterdir()] == ["outbox.json"]  # no temporary left


def test_an_unreadable_outbox_is_kept_aside(tmp_path):
    (tmp_path / "outbox.json").write_text("{not json")
    box = Outbox(tmp_path)
    assert box.pending() == []
    assert (tmp_path / "outbox.json.corrupt").read_text() == "{not json"


def test_memory_only_outbox(tmp_path):
    box = Outbox(None)
    box.add(result("a"))
    assert len(box) == 1 and box.path is None


def test_host_state_keeps_guest_uuids_and_departures(tmp_path):
    state = HostState(tmp_path)
    uuid = state.uuid_for("etch")
    assert state.uuid_for("etch") == uuid
    state.set_departed(uuid, True)
    again = HostState(tmp_path)
    assert again.uuid_for("etch") == uuid and again.is_departed(uuid)
    again.set_departed(uuid, False)
    assert not HostState(tmp_path).is_departed(uuid)
