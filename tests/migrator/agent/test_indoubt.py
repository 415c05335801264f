"""In-doubt migrations on the agents: kept on disk across restarts, reported in
every hello, answered (``migrate.query``) and settled (``migrate.resolve``) so
that exactly one copy of the guest runs."""
import dataclasses
import json
import os
import stat
import uuid

import pytest

from migrator.agent import Agent
from migrator.agent.config import RelocationConfig
from migrator.agent.indoubt import InDoubtBook
from migrator.agent.outbox import ensure_state_dir
from migrator.hypervisor import GuestState, SimDriver
from migrator.indoubt import decide
from tests.migrator.relocation.conftest import Link, pki  # noqa: F401 - the pki fixture

from .conftest import BUSY, FakeWsPortal, agent_config, guest
from .test_agent import wait_until

TICKET = "t-" + "0123456789abcdef" * 2


def test_book_is_written_atomically_and_read_back(tmp_path):
    book = InDoubtBook(tmp_path)
    record = {"job": "j1", "role": "source", "guest": str(uuid.uuid4()), "peer": "hostc",
              "reason": "no answer after ACTIVATE", "since": 1.0, "was_active": True}
    book.add(record)
    path = tmp_path / InDoubtBook.FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert InDoubtBook(tmp_path).records() == [record]   # what a restarted agent sees
    assert book.remove("j1") == record and InDoubtBook(tmp_path).records() == []
    with pytest.raises(ValueError):
        book.add({"job": "j2", "role": "bystander", "guest": "g"})
    path.write_text("{not json")
    with pytest.raises(OSError, match="unreadable"):   # never forget a paused guest quietly
        InDoubtBook(tmp_path)


# -- two real agents, a lost ACTIVATE -------------------------------------------------
@pytest.fixture
def hosts(tmp_path, pki):  # noqa: F811 - pki is the relocation tests' fixture
    """hostb (the source, with a busy guest) and hostc, each an in-process agent
    with its relocation port and its own fake portal; ``restart(name)`` stops
    an agent and starts a new one on the same driver and state directory."""
    made = {}

    def start(name, driver, portal):
        config = agent_config(tmp_path / name, portal.url, name=name,
                              guests=[guest("web-1", 16, BUSY)] if name == "hostb" else [])
        host = pki[name]
        config = dataclasses.replace(config, relocation=RelocationConfig(
            address="127.0.0.1", port=0, hosts_allow=("hostb",), cert=str(host.cert),
            key=str(host.key), ca=str(host.ca)))
        agent = Agent(config, driver, backoff=(0.05, 0.2), poll=0.1).start()
        made[name] = agent
        return agent

    for name in ("hostb", "hostc"):
        portal = FakeWsPortal().start()
        made[f"{name}-portal"] = portal
        start(name, SimDriver(name, 256), portal)

    def restart(name):
        made[name].stop()
        portal = made[f"{name}-portal"]
        seen = len(portal.messages)
        agent = start(name, made[name].driver, portal)
        return agent, portal.hello(after=seen)

    made["restart"] = restart
    yield made
    for name in ("hostb", "hostc"):
        made[name].stop()
        made[name].driver.close()
        made[f"{name}-portal"].stop()


def event_of(portal, job, kind):
    return portal.wait_for(lambda m: m["type"] == "job.event" and m["job"] == job
                           and m["event"].get("kind") == kind)["event"]


def test_lost_activate_is_held_across_restarts_and_settled_to_one_running_guest(hosts):
    hostb, hostc = hosts["hostb"], hosts["hostc"]
    portal_b, portal_c = hosts["hostb-portal"], hosts["hostc-portal"]
    wait_until(lambda: hostb.connected.is_set() and hostc.connected.is_set())
    (web,) = hostb.driver.list()
    job = str(uuid.uuid4())
    portal_c.send({"type": "command", "job": job, "action": "migrate.expect",
                   "guest": web.uuid, "source": "hostb", "ticket": TICKET})
    event_of(portal_c, job, "expecting")
    relay = Link(hostc.relocation.server.port)
    forward = hostb._event

    def lose_activate(job_id, event):  # ACTIVATE leaves the source, never arrives
        if event.get("stage") == "commitment" and event.get("side") == "source":
            relay.blackhole("up", then_cut_after=0.3)
        forward(job_id, event)

    hostb._event = lose_activate
    try:
        portal_b.send({"type": "command", "job": job, "action": "migrate", "guest": web.uuid,
                       "ticket": TICKET, "destination": {"host": "hostc",
                                                         "address": "127.0.0.1",
                                                         "port": relay.port},
                       "parameters": {"live": True, "downtime_ms": 300}})
        result = portal_b.result(job)
        event_of(portal_c, job, "in_doubt")
    finally:
        relay.close()

    assert result["state"] == "in_doubt" and "ACTIVATE" in result["error"]
    source_copy, dest_copy = hostb.driver.get(web.uuid), hostc.driver.get(web.uuid)
    assert not source_copy.active and source_copy.state is GuestState.MIGRATING  # not resumed
    assert not dest_copy.active                                                  # not guessed
    image = hostb.driver.memory_snapshot(web.uuid)
    assert (hostc.driver.memory_snapshot(web.uuid) == image).all()

    # both agents restart: the records come back from disk and are reported
    hostb, hello_b = hosts["restart"]("hostb")
    hostc, hello_c = hosts["restart"]("hostc")
    assert [(r["job"], r["role"], r["holds"]) for r in hello_b["in_doubt"]] == [
        (job, "source", "paused")]
    assert [(r["job"], r["role"], r["holds"]) for r in hello_c["in_doubt"]] == [
        (job, "destination", "paused")]
    assert hostb.driver.list() and hostb.driver.get(web.uuid).state is GuestState.MIGRATING
    wait_until(lambda: hostb.connected.is_set() and hostc.connected.is_set())

    # the portal asks both what they hold, and applies its rule
    answers = {}
    for side, portal in (("source", portal_b), ("destination", portal_c)):
        portal.send({"type": "command", "job": job, "action": "migrate.query",
                     "guest": web.uuid})
        answers[side] = event_of(portal, job, "holding")
    keep, _ = decide(answers["source"], answers["destination"])
    assert keep == "destination"
    for portal in (portal_b, portal_c):
        portal.send({"type": "command", "job": job, "action": "migrate.resolve",
                     "guest": web.uuid, "keep": keep})
    settled_b, settled_c = event_of(portal_b, job, "resolved"), event_of(portal_c, job,
                                                                         "resolved")
    assert settled_b["holds"] == "none" and settled_c["holds"] == "running"
    assert hostb.driver.list() == []                          # exactly one running guest:
    moved = hostc.driver.get(web.uuid)                        # on the destination
    assert moved.active and moved.state is GuestState.RUNNING
    for agent in (hostb, hostc):
        path = agent.in_doubt._path
        assert json.loads(path.read_text()) == []             # nothing left in doubt
    # a repeated resolve is answered, not acted on
    seen = len(portal_c.messages)
    portal_c.send({"type": "command", "job": job, "action": "migrate.resolve",
                   "guest": web.uuid, "keep": "source"})
    again = portal_c.wait_for(lambda m: m["type"] == "job.event" and m["job"] == job and
                              m["event"]["kind"] == "resolved", after=seen)["event"]
    assert again["note"] == "nothing was in doubt here" and hostc.driver.get(web.uuid).active
    _, hello_b = hosts["restart"]("hostb")
    assert hello_b["in_doubt"] == []


def migrate_b_to_c(hosts, job, port=None):
    """Announce ``job`` to hostc, start it on hostb; the source's result."""
    hostb, hostc = hosts["hostb"], hosts["hostc"]
    portal_b, portal_c = hosts["hostb-portal"], hosts["hostc-portal"]
    (web,) = hostb.driver.list()
    portal_c.send({"type": "command", "job": job, "action": "migrate.expect",
                   "guest": web.uuid, "source": "hostb", "ticket": TICKET})
    event_of(portal_c, job, "expecting")
    portal_b.send({"type": "command", "job": job, "action": "migrate", "guest": web.uuid,
                   "ticket": TICKET, "destination": {
                       "host": "hostc", "address": "127.0.0.1",
                       "port": port or hostc.relocation.server.port},
                   "parameters": {"live": True, "downtime_ms": 300}})
    return web, portal_b.result(job)


def test_the_source_puts_its_commitment_on_disk_before_activate_leaves(hosts):
    """Killed between ACTIVATE and its result, a source must come back knowing the
    guest may be the destination's: the record is on disk before ACTIVATE leaves
    (a restarted agent with it boots nothing, see the test below), and gone once
    the departure itself is on disk."""
    hostb, hostc = hosts["hostb"], hosts["hostc"]
    wait_until(lambda: hostb.connected.is_set() and hostc.connected.is_set())
    job, on_disk, forward = str(uuid.uuid4()), [], hostb._event

    def at_commitment(job_id, event):  # the source's commitment event: ACTIVATE is next
        if event.get("stage") == "commitment" and event.get("side") == "source":
            on_disk.extend(InDoubtBook(hostb.config.host.state_dir).records())
        forward(job_id, event)

    hostb._event = at_commitment
    web, result = migrate_b_to_c(hosts, job)
    assert result["state"] == "succeeded", result
    assert [(r["job"], r["role"], r["guest"]) for r in on_disk] == [(job, "source", web.uuid)]
    assert InDoubtBook(hostb.config.host.state_dir).records() == []
    assert hostb.state.is_departed(web.uuid) and hostb.driver.list() == []
    assert hostc.driver.get(web.uuid).active


def test_a_migration_that_fails_before_its_commit_point_leaves_no_record(hosts):
    hostb, hostc = hosts["hostb"], hosts["hostc"]
    wait_until(lambda: hostb.connected.is_set() and hostc.connected.is_set())
    relay = Link(hostc.relocation.server.port)
    forward = hostb._event

    def cut_in_precopy(job_id, event):
        if event.get("kind") == "round":
            relay.cut()
        forward(job_id, event)

    hostb._event = cut_in_precopy
    try:
        web, result = migrate_b_to_c(hosts, str(uuid.uuid4()), port=relay.port)
    finally:
        relay.close()
    assert result["state"] == "failed", result
    assert InDoubtBook(hostb.config.host.state_dir).records() == []
    assert not hostb.state.is_departed(web.uuid) and hostb.driver.get(web.uuid).active


def test_source_kept_after_restart_resumes_the_guest(tmp_path):
    """A source record whose destination never got the guest: keep=source
    takes it back (dirty log off, migration ended) and resumes it."""
    driver = SimDriver("hostb", 256)
    portal = FakeWsPortal().start()
    agent = None
    try:
        config = agent_config(tmp_path, portal.url, guests=[guest("web-1", 8, BUSY)])
        agent = Agent(config, driver, backoff=(0.05, 0.2), poll=0.1).start()
        (web,) = driver.list()
        agent.stop()
        driver.begin_migration(web.uuid)      # as an in-doubt source leaves it
        driver.dirty_log_start(web.uuid)
        driver.pause(web.uuid)
        InDoubtBook(config.host.state_dir).add({
            "job": "j-1", "role": "source", "guest": web.uuid, "peer": "hostc",
            "reason": "no answer after ACTIVATE", "since": 1.0, "was_active": True})
        agent = Agent(config, driver, backoff=(0.05, 0.2), poll=0.1).start()
        hello = portal.wait_for(lambda m: m["type"] == "hello" and m["in_doubt"])
        assert hello["in_doubt"][0]["holds"] == "paused"
        portal.send({"type": "command", "job": "j-1", "action": "migrate.resolve",
                     "guest": str(uuid.uuid4()), "keep": "source"})   # another guest: ignored
        portal.send({"type": "command", "job": "j-1", "action": "migrate.resolve",
                     "guest": web.uuid, "keep": "source"})
        settled = event_of(portal, "j-1", "resolved")
        assert settled["holds"] == "running" and settled["keep"] == "source"
        info = driver.get(web.uuid)
        assert info.active and info.state is GuestState.RUNNING and not info.dirty_log
        assert agent.in_doubt.records() == []
    finally:
        if agent is not None:
            agent.stop()
        portal.stop()
        driver.close()


def test_a_restarted_source_does_not_boot_a_guest_whose_migration_is_in_doubt(tmp_path):
    """The host restarted and lost its paused copy: booting the config guest
    afresh would make a second copy of a guest the destination may own."""
    guest_uuid = str(uuid.uuid4())
    portal = FakeWsPortal().start()
    driver = SimDriver("hostb", 256)
    agent = None
    try:
        config = agent_config(tmp_path, portal.url,
                              guests=[guest("web-1", 8, BUSY, uuid=guest_uuid)])
        ensure_state_dir(config.host.state_dir)
        InDoubtBook(config.host.state_dir).add({
            "job": "j-2", "role": "source", "guest": guest_uuid, "peer": "hostc",
            "reason": "no answer after ACTIVATE", "since": 1.0, "was_active": True})
        agent = Agent(config, driver, backoff=(0.05, 0.2), poll=0.1).start()
        hello = portal.hello()
        assert driver.list() == [] and hello["guests"] == []
        assert [(r["job"], r["holds"]) for r in hello["in_doubt"]] == [("j-2", "none")]
    finally:
        if agent is not None:
            agent.stop()
        portal.stop()
        driver.close()
