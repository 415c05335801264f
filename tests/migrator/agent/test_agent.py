"""The agent against a fake portal: connection, hello, save, restore, outbox."""
import hashlib
import json
import logging
import os
import stat
import time
import uuid

import numpy as np

from migrator.agent import Agent, Outbox
from migrator.hypervisor import GuestSpec, GuestState, SimDriver
from migrator.hypervisor.savestream import parse_stream
from tests.support.polling import wait_for

from .conftest import (
    BUSY,
    HOST_CREDENTIAL,
    IDLE,
    JOB_CREDENTIAL,
    FakeImages,
    FakeWsPortal,
    agent_config,
    guest,
    restore_command,
    save_command,
)


def only_guest(agent):
    (info,) = agent.driver.list()
    return info


def wait_until(predicate, timeout=10.0):
    wait_for(predicate, "the condition", timeout, interval=0.02)


# -- connection ------------------------------------------------------------------
def test_hello_carries_host_facts_guests_and_capacity(portal, make_agent):
    agent = make_agent(portal.url, guests=[guest("debian_etch", uuid=str(uuid.uuid4()))])
    hello = portal.hello()
    assert hello["protocol"] == 1 and hello["host"] == "hostb" and hello["driver"] == "sim"
    assert hello["arch"] == "x86_64" and hello["virt_extensions"] == ["vmx"]
    assert hello["subnet"] == "192.168.1.0/24" and hello["storage"] == ["hosta:/xen-storage"]
    assert hello["relocation"] == {"address": "127.0.0.1", "port": 8002}
    assert hello["capacity"] == {"memory_mib": 256, "used_mib": 8, "reserved_mib": 0,
                                 "disk_gib": 100}
    (g,) = hello["guests"]
    assert g["name"] == "debian_etch" and g["uuid"] == only_guest(agent).uuid
    assert g["domain_id"] == 1 and g["state"] == "running" and g["active"] is True
    assert g["memory_mib"] == 8 and g["vcpus"] == 1
    assert g["config"] == {"kernel": "/boot/vmlinuz-2.6.16.38-xenU", "ip": "192.168.1.110",
                           "storage": [], "workload": {"profile": "idle", "rate": 0}}
    assert hello["jobs"] == [] and hello["results"] == []


def test_inventory_follows_changes(portal, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch")])
    start = len(portal.messages)
    portal.hello()
    agent.driver.pause(only_guest(agent).uuid)
    inv = portal.wait_for(lambda m: m["type"] == "inventory" and m["guests"][0]["state"]
                          == "paused", after=start)
    assert inv["capacity"]["used_mib"] == 8


def test_a_view_taken_while_a_job_ended_is_not_sent_after_its_result(portal, make_agent):
    """Sent after the result, a view from before it would move the guest back at the portal."""
    agent = make_agent(portal.url, guests=[guest("etch")])
    portal.hello()
    take_view, calls = agent.inventory, []

    def view_during_which_a_job_ends():
        calls.append(1)
        view = take_view()
        if len(calls) == 1:  # the job ends while this view is being taken
            agent._finish("job-x", {"type": "job.result", "job": "job-x", "state": "failed",
                                    "error": "ended mid-view"})
            view["capacity"]["used_mib"] = 12345  # marks the stale view
        return view

    agent.inventory = view_during_which_a_job_ends
    start = len(portal.messages)
    agent.driver.pause(only_guest(agent).uuid)  # something changed: a view is due
    portal.wait_for(lambda m: m["type"] == "inventory" and m["guests"][0]["state"] == "paused",
                    after=start)
    # The result goes out through the outbox, which may send it after that view.
    portal.wait_for(lambda m: m["type"] == "job.result" and m["job"] == "job-x", after=start)
    sent = portal.messages[start:]
    assert [m for m in sent if m["type"] == "inventory"
            and m["capacity"]["used_mib"] == 12345] == []


def test_refused_credential_is_retried_with_backoff_until_fixed(portal, make_agent, caplog):
    portal.credential = "hc_something-else"
    with caplog.at_level(logging.WARNING, logger="berth.agent"):
        agent = make_agent(portal.url, backoff=(0.1, 0.4))
        wait_until(lambda: portal.refused >= 3)
        assert agent._thread.is_alive() and not agent.connected.is_set()
        refusals = [r.getMessage() for r in caplog.records if "HTTP 403" in r.getMessage()]
        assert refusals and "credential" in refusals[0] and "retrying in" in refusals[0]
        # Delays grow: three attempts take at least 0.1*0.8 + 0.2*0.8 s.
        portal.credential = HOST_CREDENTIAL  # the operator fixes it
        portal.hello()
    assert HOST_CREDENTIAL not in caplog.text


def test_reconnects_after_the_portal_drops_the_connection(portal, make_agent):
    agent = make_agent(portal.url)
    portal.hello()
    count = len(portal.messages)
    portal.drop()
    portal.hello(after=count)
    assert agent.connections == 2


# -- save ------------------------------------------------------------------------
def test_save_uploads_the_paused_memory_and_destroys_the_guest(portal, images, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch", workload=BUSY)])
    info = only_guest(agent)
    at_pause = {}
    images.on_upload = lambda headers: at_pause.update(
        state=agent.driver.get(info.uuid).state,
        memory=agent.driver.memory_snapshot(info.uuid))
    portal.hello()
    command = save_command(info.uuid, images)
    portal.send(command)
    result = portal.result(command["job"])
    assert result["state"] == "succeeded", result
    ((headers, body),) = images.uploads
    assert result["result"]["image"] == next(iter(images.images))
    assert result["result"]["memory_sha256"] == hashlib.sha256(at_pause["memory"]).hexdigest()
    assert at_pause["state"] is GuestState.SAVING
    parsed = parse_stream([body])
    assert parsed.header.uuid == info.uuid
    assert np.array_equal(parsed.memory, at_pause["memory"])  # byte for byte
    assert headers["X-Berth-Guest-UUID"] == info.uuid
    assert headers["X-Berth-Guest-Name"] == "etch" and headers["X-Berth-Name"] == "etch test image"
    assert headers["X-Berth-Source-Host"] == "hostb" and headers["X-Berth-Memory-MiB"] == "8"
    assert headers["X-Berth-VCPUs"] == "1" and headers["X-Berth-Architecture"] == "x86_64"
    assert headers["X-Berth-Virt-Extensions"] == "vmx"
    assert headers["Content-Type"] == "application/octet-stream"
    assert int(headers["Content-Length"]) == len(body)
    assert agent.driver.list() == []
    stages = [m["event"]["stage"] for m in portal.messages
              if m["type"] == "job.event" and m["event"]["kind"] == "stage"]
    assert stages == ["pausing", "measuring", "saving", "destroying"]
    progress = [m["event"] for m in portal.messages
                if m["type"] == "job.event" and m["event"]["kind"] == "progress"]
    assert progress[-1]["done_bytes"] == progress[-1]["total_bytes"] == len(body)
    portal.wait_for(lambda m: m["type"] == "inventory" and m["guests"] == [])
    wait_until(lambda: len(agent.outbox) == 0)  # acked


def test_refused_upload_resumes_the_guest_with_the_portals_reason(portal, images, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch")])
    info = only_guest(agent)
    before = agent.driver.memory_digest(info.uuid)
    images.mode = "refuse"
    portal.hello()
    command = save_command(info.uuid, images)
    portal.send(command)
    result = portal.result(command["job"])
    assert result["state"] == "failed"
    assert "422" in result["error"] and "does not match X-Berth-SHA256" in result["error"]
    after = agent.driver.get(info.uuid)
    assert after.state is GuestState.RUNNING and after.active
    assert agent.driver.memory_digest(info.uuid) == before


def test_an_upload_url_off_the_enrolled_portal_is_refused_and_nothing_sent(
        portal, images, make_agent):
    """A command naming another address (the portal's misconfigured URL, another
    port on a shared machine) fails: no byte leaves, the guest keeps running."""
    decoy = FakeImages()
    try:
        agent = make_agent(portal.url, guests=[guest("etch")])
        info = only_guest(agent)
        portal.hello()
        command = save_command(info.uuid, images)
        command["upload"]["url"] = f"{decoy.url}/api/v1/images/"
        portal.send(command)
        result = portal.result(command["job"])
        assert result["state"] == "failed"
        assert "not the enrolled portal" in result["error"]
        assert decoy.uploads == [] and images.uploads == []
        assert agent.driver.get(info.uuid).state is GuestState.RUNNING
    finally:
        decoy.stop()


def test_a_relative_upload_url_goes_to_the_enrolled_portal(portal, images, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch")])
    info = only_guest(agent)
    portal.hello()
    command = save_command(info.uuid, images)
    command["upload"]["url"] = "api/v1/images/"
    portal.send(command)
    assert portal.result(command["job"])["state"] == "succeeded"
    assert len(images.uploads) == 1


def test_connection_drop_mid_upload_resumes_the_guest(portal, images, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch", memory_mib=16)])
    info = only_guest(agent)
    images.mode = "drop"
    portal.hello()
    command = save_command(info.uuid, images)
    portal.send(command)
    result = portal.result(command["job"])
    assert result["state"] == "failed" and "upload" in result["error"]
    after = agent.driver.get(info.uuid)
    assert after.state is GuestState.RUNNING and after.active


def test_a_paused_guest_stays_paused_after_a_failed_save(portal, images, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch")])
    info = only_guest(agent)
    agent.driver.pause(info.uuid)
    images.mode = "refuse"
    portal.hello()
    command = save_command(info.uuid, images)
    portal.send(command)
    assert portal.result(command["job"])["state"] == "failed"
    after = agent.driver.get(info.uuid)
    assert after.state is GuestState.PAUSED and not after.active


def test_abort_during_save_resumes_the_guest(portal, images, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch", memory_mib=16)])
    info = only_guest(agent)
    images.mode = "stall"
    portal.hello()
    command = save_command(info.uuid, images)
    portal.send(command)
    assert images.stalled.wait(10)
    started = time.monotonic()
    portal.send({"type": "command", "job": command["job"], "action": "abort",
                  "reason": "aborted by alice"})
    result = portal.result(command["job"])
    assert time.monotonic() - started < 5  # the blocked socket was shut down
    assert (result["state"], result["error"]) == ("aborted", "aborted by alice")
    after = agent.driver.get(info.uuid)
    assert after.state is GuestState.RUNNING and after.active
    assert images.uploads == []


def test_second_command_for_a_busy_guest_fails_at_once(portal, images, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch", memory_mib=16)])
    info = only_guest(agent)
    images.mode = "stall"
    portal.hello()
    first = save_command(info.uuid, images)
    portal.send(first)
    assert images.stalled.wait(10)
    hello_jobs = agent.hello()["jobs"]
    assert hello_jobs == [{"job": first["job"], "state": "running"}]
    second = save_command(info.uuid, images)
    portal.send(second)
    result = portal.result(second["job"], timeout=5)
    assert result["state"] == "failed" and "busy" in result["error"]
    assert first["job"] in result["error"]
    images.release.set()
    assert portal.result(first["job"])["state"] == "succeeded"


def test_save_of_an_unknown_guest_and_unknown_actions_fail(portal, images, make_agent):
    make_agent(portal.url)
    portal.hello()
    missing = save_command(str(uuid.uuid4()), images)
    portal.send(missing)
    assert "no guest" in portal.result(missing["job"])["error"]
    odd = {"type": "command", "job": str(uuid.uuid4()), "action": "teleport"}
    portal.send(odd)
    result = portal.result(odd["job"])
    assert result["state"] == "failed" and "unknown action" in result["error"]
    bad = {"type": "command", "job": str(uuid.uuid4()), "action": "save", "guest": "x"}
    portal.send(bad)
    assert "not a UUID" in portal.result(bad["job"])["error"]


def test_credentials_never_reach_the_logs(portal, images, make_agent, caplog):
    with caplog.at_level(logging.DEBUG):
        agent = make_agent(portal.url, guests=[guest("etch")])
        portal.hello()
        command = save_command(only_guest(agent).uuid, images)
        portal.send(command)
        portal.result(command["job"])
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("berth"))
    assert "Authorization: Host [redacted]" in ours  # websockets' DEBUG handshake log
    assert HOST_CREDENTIAL not in ours and JOB_CREDENTIAL not in ours
    assert HOST_CREDENTIAL not in repr(agent.config) and JOB_CREDENTIAL not in repr(agent)


# -- restore -----------------------------------------------------------------------
def test_save_then_restore_gives_a_new_domain_id_and_the_same_uuid(portal, images, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch")])
    info = only_guest(agent)
    digest = agent.driver.memory_digest(info.uuid)  # idle, rate 0: memory does not move
    portal.hello()
    save = save_command(info.uuid, images)
    portal.send(save)
    image = portal.result(save["job"])["result"]["image"]
    data = images.images[image]
    restore = restore_command(image, data, info.uuid, images)
    portal.send(restore)
    result = portal.result(restore["job"])
    assert result["state"] == "succeeded", result
    g = result["result"]["guest"]
    assert g["uuid"] == info.uuid and g["domain_id"] != info.domid
    assert g["state"] == "running" and g["active"] is True
    assert agent.driver.memory_digest(info.uuid) == digest
    progress = [m["event"] for m in portal.messages if m["type"] == "job.event"
                and m["job"] == restore["job"] and m["event"]["kind"] == "progress"]
    assert progress[-1] == {"kind": "progress", "stage": "restoring",
                            "done_bytes": len(data), "total_bytes": len(data)}


def saved_elsewhere():
    """(uuid, memory digest, save stream) of a 4 MiB guest saved on another host."""
    source = SimDriver("hosta", 64)
    try:
        made = source.create(GuestSpec("ubuntu_fuwa", 4, config={"workload": IDLE}))
        source.pause(made.uuid)
        return made.uuid, source.memory_digest(made.uuid), b"".join(
            source.save_stream(made.uuid))
    finally:
        source.close()


def test_restore_of_an_image_from_another_host(portal, images, make_agent):
    guest_uuid, digest, data = saved_elsewhere()
    agent = make_agent(portal.url, guests=[guest("etch")])
    portal.hello()
    command = restore_command(images.add_image(data), data, guest_uuid, images)
    portal.send(command)
    result = portal.result(command["job"])
    assert result["state"] == "succeeded", result
    g = result["result"]["guest"]
    assert g["name"] == "ubuntu_fuwa" and g["uuid"] == guest_uuid and g["domain_id"] == 2
    assert agent.driver.memory_digest(guest_uuid) == digest


def test_corrupted_download_creates_no_guest(portal, images, make_agent):
    agent = make_agent(portal.url)
    portal.hello()
    guest_uuid, _, data = saved_elsewhere()
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF
    image = images.add_image(bytes(corrupt))
    # The portal's digest is of the good image; the stream's own digest fails first.
    command = restore_command(image, bytes(corrupt), guest_uuid, images)
    portal.send(command)
    result = portal.result(command["job"])
    assert result["state"] == "failed" and "damaged" in result["error"]
    assert agent.driver.list() == [] and agent.driver.capacity().used_mib == 0
    assert agent.driver.capacity().reserved_mib == 0


def test_truncated_or_mismatching_download_creates_no_guest(portal, images, make_agent):
    agent = make_agent(portal.url)
    portal.hello()
    guest_uuid, _, data = saved_elsewhere()
    image = images.add_image(data)
    images.truncate = len(data) - 100
    short = restore_command(image, data, guest_uuid, images)
    portal.send(short)
    result = portal.result(short["job"])
    assert result["state"] == "failed" and "ended after" in result["error"]
    images.truncate = None
    wrong = restore_command(image, data, guest_uuid, images)
    wrong["image"]["sha256"] = "0" * 64
    portal.send(wrong)
    result = portal.result(wrong["job"])
    assert result["state"] == "failed" and "SHA-256" in result["error"]
    assert agent.driver.list() == [] and agent.driver.capacity().reserved_mib == 0


def test_an_image_that_fails_its_integrity_check_fails_the_restore_saying_so(
        portal, images, make_agent):
    agent = make_agent(portal.url)
    portal.hello()
    guest_uuid, _, data = saved_elsewhere()
    image = images.add_image(data)
    images.mode = "integrity"
    refused = restore_command(image, data, guest_uuid, images)
    portal.send(refused)
    result = portal.result(refused["job"])
    assert result["state"] == "failed"
    assert f"image {image} failed its integrity check" in result["error"]
    assert "nothing was restored" in result["error"]
    # Cut mid-answer (the portal stops at a chunk that fails): the error says it may be that.
    images.mode, images.truncate = "ok", len(data) // 2
    cut = restore_command(image, data, guest_uuid, images)
    portal.send(cut)
    result = portal.result(cut["job"])
    assert result["state"] == "failed" and "ended after" in result["error"]
    assert "failed its integrity check" in result["error"]
    assert agent.driver.list() == [] and agent.driver.capacity().reserved_mib == 0


def test_restore_refusals_are_clear(portal, images, make_agent):
    agent = make_agent(portal.url, memory_mib=2)
    portal.hello()
    guest_uuid, _, data = saved_elsewhere()
    image = images.add_image(data)
    no_room = restore_command(image, data, guest_uuid, images)
    portal.send(no_room)
    assert "cannot fit 4 MiB" in portal.result(no_room["job"])["error"]
    denied = restore_command(image, data, guest_uuid, images)
    denied["download"]["credential"] = "jc_wrong"
    portal.send(denied)
    error = portal.result(denied["job"])["error"]
    assert "403" in error and "You may not download this image." in error
    assert agent.driver.list() == []
    agent.driver.create(GuestSpec("ubuntu_fuwa", 1, uuid=guest_uuid))
    twice = restore_command(image, data, guest_uuid, images)
    portal.send(twice)
    assert "is already on host hostb as domain" in portal.result(twice["job"])["error"]


def test_abort_during_restore_creates_no_guest(portal, images, make_agent):
    agent = make_agent(portal.url)
    portal.hello()
    guest_uuid, _, data = saved_elsewhere()
    image = images.add_image(data)
    images.mode = "stall"
    command = restore_command(image, data, guest_uuid, images)
    portal.send(command)
    assert images.stalled.wait(10)
    portal.send({"type": "command", "job": "not-running", "action": "abort"})  # ignored
    portal.send({"type": "command", "job": command["job"], "action": "abort"})
    result = portal.result(command["job"], timeout=5)
    assert (result["state"], result["error"]) == ("aborted", "aborted on request")  # no reason
    assert agent.driver.list() == [] and agent.driver.capacity().reserved_mib == 0
    assert agent.outbox.get("not-running") is None


# -- outbox --------------------------------------------------------------------------
def test_results_survive_a_portal_restart_and_are_resent_until_acked(
        portal, images, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch", memory_mib=16)])
    info = only_guest(agent)
    images.mode = "stall"
    portal.hello()
    command = save_command(info.uuid, images)
    portal.send(command)
    assert images.stalled.wait(10)
    port = portal.port
    portal.stop()  # the portal goes away mid-job...
    images.release.set()
    wait_until(lambda: agent.outbox.get(command["job"]) is not None)  # ...the job finishes
    assert agent.driver.list() == []

    again = FakeWsPortal()
    again.auto_ack = False
    again.start(port)
    try:
        hello = again.hello()
        assert [r["job"] for r in hello["results"]] == [command["job"]]
        assert hello["results"][0]["state"] == "succeeded"
        assert hello["jobs"] == []
        again.drop()  # not acknowledged: the next hello carries it again
        hello = again.hello(after=len(again.messages))
        assert [r["job"] for r in hello["results"]] == [command["job"]]
        again.send({"type": "ack", "job": command["job"]})
        wait_until(lambda: len(agent.outbox) == 0)
        assert json.loads(agent.outbox.path.read_text()) == []
    finally:
        again.stop()


def test_outbox_is_persisted_and_read_by_a_new_agent(portal, tmp_path):
    config = agent_config(tmp_path, portal.url)
    first = Agent(config, SimDriver("hostb", 64))
    first.handle_command({"type": "command", "job": "job-1", "action": "bogus"})
    first.driver.close()
    path = first.outbox.path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert [r["job"] for r in Outbox(path.parent).pending()] == ["job-1"]

    portal.auto_ack = False
    second = Agent(config, SimDriver("hostb", 64), backoff=(0.05, 0.2)).start()
    try:
        hello = portal.hello()
        assert [r["job"] for r in hello["results"]] == ["job-1"]
        assert hello["results"][0]["type"] == "job.result"
    finally:
        second.stop()
        second.driver.close()


def test_repeated_command_does_not_run_twice(portal, images, make_agent):
    agent = make_agent(portal.url, guests=[guest("etch")])
    portal.auto_ack = False
    portal.hello()
    command = save_command(only_guest(agent).uuid, images)
    portal.send(command)
    portal.result(command["job"])
    count = len(portal.messages)
    portal.send(command)  # e.g. resent after a reconnect
    again = portal.wait_for(lambda m: m["type"] == "job.result", after=count)
    assert again["state"] == "succeeded" and len(images.uploads) == 1


def test_saved_guest_is_not_booted_again_by_a_restarted_agent(portal, images, make_agent,
                                                              tmp_path):
    spec = guest("etch")
    agent = make_agent(portal.url, guests=[spec])
    info = only_guest(agent)
    portal.hello()
    command = save_command(info.uuid, images)
    portal.send(command)
    assert portal.result(command["job"])["state"] == "succeeded"
    agent.stop()
    restarted = Agent(agent_config(tmp_path, portal.url, guests=[spec]), SimDriver("hostb", 64))
    restarted.boot_guests()
    assert restarted.driver.list() == []
    restarted.driver.close()
    # A config guest without a uuid keeps the one the agent gave it.
    assert restarted.state.uuid_for("etch") == info.uuid
