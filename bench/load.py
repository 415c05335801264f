"""Load benchmark: many watchers, many jobs and long lists through a real portal and real agents.

One uvicorn portal process and four `manage.py relocationd` agents (sim hosts)
on loopback, with a throwaway database and data directory. Measured in one run:

1. **Watchers**: N WebSocket watchers (default 200) of one live migration, each
   on ``/ws/jobs/<id>/`` with a signed-in session cookie. The destination agent
   is held (SIGSTOP) from the moment the job is created until every watcher has
   its snapshot, so every event after the job's creation reaches a subscribed
   watcher. Each watcher must receive every seq from its snapshot's
   ``event_seq`` to the final job's; delivery latency = receipt - the event's
   ``published_at`` (same machine clock).
2. **Saves and restores**: 20 saves across 4 hosts at once; each image is
   restored (onto the next host) as soon as its save succeeds, so saves and
   restores overlap. Every restore must report the saved memory's SHA-256.
3. **Lists**: /api/v1/images/, /audit/, /jobs/, /guests/ with 10,000 images
   and 100,000 audit records (bulk fixtures; the audit chain is computed for
   real and verified at the end): latency of the first page, p50/p95.

    python bench/load.py [--watchers 200] [--jobs 20] [--images 10000] [--audit 100000]

SQLite and the in-memory channel layer by default. With a PostgreSQL
DATABASE_URL it creates (and drops) its own database on that server; with
BERTH_REDIS_URL its keys carry a prefix of their own. Results:
bench/results/load.json (and printed).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.browser_socket import sign_in  # noqa: E402
from tests.support.polling import wait_for  # noqa: E402

MiB = 1024 * 1024
SHARED = "hosta:/xen-storage"
HOSTS = ("load1", "load2", "load3", "load4")
SCOPES = ("guests:read", "guests:save", "guests:migrate", "images:read", "images:restore",
          "jobs:read", "audit:read")
LISTS = ("/api/v1/images/", "/api/v1/audit/", "/api/v1/jobs/", "/api/v1/guests/")
TARGETS = {"watcher_p99_ms": 250, "list_p95_ms": 50}
FINAL = ("succeeded", "failed", "aborted")
POLL_S = 0.25  # the portal under measurement is asked less often than in the tests


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(seconds):
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50": round(percentile(ms, 50), 1), "p95": round(percentile(ms, 95), 1),
            "p99": round(percentile(ms, 99), 1), "max": round(max(ms), 1)}


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------
# an isolated database and data directory
@contextmanager
def throwaway_database():
    """SQLite under BERTH_DATA_DIR by default; with a PostgreSQL DATABASE_URL, a fresh
    database beside the one it names, for this run only, dropped afterwards."""
    from tests.support.server import PostgresDatabase, on_postgresql

    if not on_postgresql():
        yield "sqlite"
        return
    base, database = os.environ["DATABASE_URL"], PostgresDatabase()
    os.environ["DATABASE_URL"] = database.url
    try:
        yield "postgresql"
    finally:
        os.environ["DATABASE_URL"] = base
        database.drop()


def configure_django(data_dir: Path):
    os.environ.update({
        "BERTH_DATA_DIR": str(data_dir), "BERTH_LOG_LEVEL": "WARNING",
        # The limiter is not what is measured: one token makes thousands of requests.
        "BERTH_API_RATE_USER": "1000000/min",
        # A shared Redis (if any) must not mix this run's groups with anyone else's.
        "BERTH_REDIS_PREFIX": f"berth-load-{os.getpid()}",
        "DJANGO_SETTINGS_MODULE": "portal.settings"})
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def guest_spec(name, memory_mib, ip, workload):
    return {"name": name, "uuid": str(uuid.uuid4()), "memory_mib": memory_mib, "vcpus": 1,
            "kernel": "/boot/vmlinuz", "ip": ip, "storage": [SHARED],
            "workload": {"profile": workload}}


def enroll_hosts(portal_url, per_host, guest_mib, mover_mib):
    """Four sim hosts that trust each other; ``per_host`` small guests on each, and
    the migration's guest on load1. Returns {host: config path}."""
    from migrator.enrollment import HostSpec, enroll
    from tests.support.server import free_port

    configs, n = {}, 0
    for index, name in enumerate(HOSTS):
        guests = []
        for _ in range(per_host):
            n += 1
            guests.append(guest_spec(f"g{n:02d}", guest_mib, f"192.168.1.{100 + n}", "idle"))
        if index == 0:
            guests.append(guest_spec("mover", mover_mib, "192.168.1.90", "web"))
        spec = HostSpec(name=name, relocation_port=free_port(), storage=[SHARED],
                        memory_mib=8192, hosts_allow=[h for h in HOSTS if h != name],
                        guests=guests)
        configs[name] = enroll(spec, portal_url=portal_url)
    return configs


def issue_token():
    from django.core.management import call_command

    out = io.StringIO()
    call_command("tokens", "issue", "admin", *sum((["--scope", s] for s in SCOPES), []),
                 stdout=out)
    return out.getvalue().split("token: ")[1].split()[0]


def bulk_fixtures(images, audit_records):
    """``images`` image rows and ``audit_records`` audit records, created in bulk."""
    from django.contrib.auth import get_user_model

    from portal import audit
    from vault.models import SavedImage

    admin = get_user_model().objects.get(username="admin")
    t = time.monotonic()
    SavedImage.objects.bulk_create((SavedImage(
        name=f"fixture {i}", guest_uuid=uuid.uuid4(), guest_name=f"guest-{i % 500}",
        source_host=HOSTS[i % 4], plaintext_size=64 * MiB, stored_size=26 * MiB,
        sha256=f"{i:064x}", key_version=1, format_version=1, algorithm="aes-256-gcm",
        chunk_size=MiB, memory_mib=64, vcpus=1, architecture="x86_64", virt_extensions="vmx",
        created_by=admin) for i in range(images)), batch_size=2000)
    images_s = time.monotonic() - t
    t = time.monotonic()
    actor = audit.Actor("token", "admin:token:fixture")
    audit.record_many({"action": "image.view", "actor": actor, "target": f"image:{i}",
                       "source_ip": "127.0.0.1", "details": {"fixture": i}}
                      for i in range(audit_records))
    return {"images": images, "audit_records": audit_records,
            "images_s": round(images_s, 2), "audit_s": round(time.monotonic() - t, 2)}


# --------------------------------------------------------------------------
# processes
class Agents:
    """The four agents as child processes; stop() ends each one it started."""

    def __init__(self, configs, env, log_dir):
        self.processes = {}
        for name, config in configs.items():
            log = open(log_dir / f"agent-{name}.log", "ab")  # noqa: SIM115
            self.processes[name] = subprocess.Popen(
                [sys.executable, "manage.py", "relocationd", "--config", str(config)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def pause(self, name):
        self.processes[name].send_signal(signal.SIGSTOP)

    def resume(self, name):
        self.processes[name].send_signal(signal.SIGCONT)

    def stop(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a held agent must be able to exit
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Api:
    def __init__(self, url, token):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=60,
                                 headers={"Authorization": f"Token {token}"})

    def get(self, path, **params):
        response = self.http.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def post(self, path, body=None):
        response = self.http.post(path, json=body)
        if response.status_code != 202:
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    def all_jobs(self):
        jobs, page = [], 1
        while True:
            data = self.get("/api/v1/jobs/", page=page)
            jobs += data["results"]
            if not data["next"]:
                return {j["id"]: j for j in jobs}
            page += 1

    def guests(self):
        return {g["name"]: g for g in self.get("/api/v1/guests/")["results"]}


# --------------------------------------------------------------------------
# 1. watchers of a live migration
async def watcher(url, origin, cookie, subscribed, timeout, deflate):
    from websockets.asyncio.client import connect

    async with connect(url, origin=origin, additional_headers={"Cookie": f"sessionid={cookie}"},
                       open_timeout=120, max_size=2**24,
                       compression="deflate" if deflate else None) as socket:
        snapshot = json.loads(await socket.recv())
        start = snapshot["jobs"][0]["event_seq"]
        subscribed()
        received = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await socket.recv()
                now = time.time()
                event = json.loads(raw)
                received.append((event["seq"], event["type"], (event.get("event") or {})
                                 .get("kind"), now - event["published_at"], len(raw)))
                if event["type"] == "final":
                    return start, received


async def watch_all(portal, job_id, cookie, count, release, timeout, deflate):
    ws_url = portal.url.replace("http://", "ws://") + f"/ws/jobs/{job_id}/"
    connected = 0
    all_in = asyncio.Event()

    def subscribed():
        nonlocal connected
        connected += 1
        if connected == count:
            all_in.set()

    t = time.monotonic()
    tasks = [asyncio.create_task(watcher(ws_url, portal.url, cookie, subscribed, timeout,
                                         deflate)) for _ in range(count)]
    try:
        await asyncio.wait_for(all_in.wait(), 120)
    finally:
        connect_s = time.monotonic() - t
        release()  # whatever happened, the held agent runs on
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return connect_s, results


def watchers_phase(portal, api, agents, cookie, count, live_settings, deflate=True):
    mover = api.guests()["mover"]
    agents.pause("load2")  # the destination: nothing happens until every watcher is in
    try:
        job = api.post(f"/api/v1/guests/{mover['uuid']}/migrate",
                       {"destination": "load2", "live": True, **live_settings})
    except BaseException:
        agents.resume("load2")
        raise
    load_before = load_average()
    def cpu_now():
        return {"portal": cpu_seconds(portal.process.pid), "watchers": cpu_seconds()}

    cpu = {"start": cpu_now()}

    def release():
        cpu["subscribed"] = cpu_now()
        agents.resume("load2")

    connect_s, results = asyncio.run(watch_all(portal, job["id"], cookie, count, release,
                                               timeout=180, deflate=deflate))
    cpu["end"] = cpu_now()
    final = wait_for(lambda: (j := api.get(f"/api/v1/jobs/{job['id']}"))["state"] in FINAL
                     and j, "the migration to end", 120, POLL_S)
    report = judge_watchers(final, results, connect_s, load_before)
    report["permessage_deflate"] = deflate
    # CPU, unlike latency, does not depend on what else the machine runs.
    deliveries = max(report["deliveries"], 1)
    connecting = {k: cpu["subscribed"][k] - cpu["start"][k] for k in cpu["start"]}
    delivering = {k: cpu["end"][k] - cpu["subscribed"][k] for k in cpu["start"]}
    report["cpu_s_connecting"] = {k: round(v, 2) for k, v in connecting.items()}
    report["cpu_s_during_migration"] = {k: round(v, 2) for k, v in delivering.items()}
    report["cpu_us_per_delivery"] = {k: round(v / deliveries * 1e6)
                                     for k, v in delivering.items()}
    return report


def cpu_seconds(pid=None):
    """User + system CPU seconds of a process (this one by default)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def judge_watchers(job, results, connect_s, load_before):
    """Did every watcher get every seq from its snapshot to the job's last one?"""
    last = job["event_seq"]
    latencies, complete, problems, duplicates, reordered = [], 0, [], 0, 0
    for index, result in enumerate(results):
        if isinstance(result, BaseException):
            problems.append(f"watcher {index}: {type(result).__name__}: {result}")
            continue
        start, received = result
        seqs = [r[0] for r in received]
        duplicates += len(seqs) - len(set(seqs))
        reordered += sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b < a)
        missing = sorted(set(range(start + 1, last + 1)) - set(seqs))
        if missing:
            problems.append(f"watcher {index}: missing seq {missing[:10]}")
        else:
            complete += 1
        latencies += [r[3] for r in received]
    spread = per_event_spread(r[1] for r in results if not isinstance(r, BaseException))
    sample = next((r for r in results if not isinstance(r, BaseException)), None)
    kinds = [r[2] or r[1] for r in sample[1]] if sample else []
    delivered = summary_ms(latencies) if latencies else None
    return {
        "watchers": len(results), "complete": complete, "problems": problems[:20],
        "job": {"state": job["state"], "event_seq": last, "rounds": len(job["rounds"]),
                "stages": [s["stage"] for s in job["timeline"]],
                "downtime_ms": job["result"].get("downtime_ms"),
                "stop_reason": job["result"].get("stop_reason")},
        "watcher_start_seq": sorted({r[0] for r in results
                                     if not isinstance(r, BaseException)}),
        "events_per_watcher": len(kinds), "event_kinds": kinds,
        "round_events_match_job_rounds": kinds.count("round") == len(job["rounds"]),
        "duplicates": duplicates, "out_of_order": reordered,
        "deliveries": len(latencies), "connect_all_s": round(connect_s, 2),
        "per_event_first_last_ms": spread,
        "latency_ms": delivered, "load_average_before": load_before,
        "load_average_after": load_average(),
        "target_p99_ms": TARGETS["watcher_p99_ms"],
        "meets_target": bool(delivered and complete == len(results)
                             and delivered["p99"] <= TARGETS["watcher_p99_ms"]),
    }


def per_event_spread(receipts):
    """For each seq: latency to the first and to the last watcher (fan-out cost)."""
    by_seq = {}
    for received in receipts:
        for seq, kind, event_kind, latency, size in received:
            by_seq.setdefault(seq, [event_kind or kind, size, []])[2].append(latency * 1000)
    return [{"seq": seq, "kind": kind, "bytes": size, "first": round(min(ms), 1),
             "last": round(max(ms), 1)} for seq, (kind, size, ms) in sorted(by_seq.items())]


# --------------------------------------------------------------------------
# 2. saves and restores across the four hosts
def saves_and_restores(api, count):
    guests = api.guests()
    names = sorted(n for n in guests if n.startswith("g"))[:count]
    next_host = {h: HOSTS[(i + 1) % len(HOSTS)] for i, h in enumerate(HOSTS)}
    load_before = load_average()
    t = time.monotonic()
    saves = {api.post(f"/api/v1/guests/{guests[n]['uuid']}/save")["id"]: n for n in names}
    restores, done = {}, {}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        jobs = api.all_jobs()
        for job_id in [*saves, *restores]:
            job = jobs.get(job_id)
            if job_id in done or job is None or job["state"] not in FINAL:
                continue
            done[job_id] = job
            if job_id in saves and job["state"] == "succeeded":
                host = next_host[guests[saves[job_id]]["host"]]
                restore = api.post(f"/api/v1/images/{job['image']}/restore", {"host": host})
                restores[restore["id"]] = job_id
        if all(job_id in done for job_id in [*saves, *restores]):
            break
        time.sleep(POLL_S)
    wall = time.monotonic() - t
    return judge_saves(saves, restores, done, count, wall, load_before)


def judge_saves(saves, restores, done, count, wall, load_before):
    def took(job):
        start, end = job.get("started_at") or job["created_at"], job["finished_at"]
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()

    identical, failures, pairs = 0, [], []
    for restore_id, save_id in restores.items():
        save, restore = done.get(save_id), done.get(restore_id)
        if restore is None or restore["state"] != "succeeded":
            failures.append(f"restore {restore_id}: {restore and restore['error'] or 'unfinished'}")
            continue
        same = save["result"]["memory_sha256"] == restore["result"]["memory_sha256"]
        identical += same
        pairs.append({"guest": save["guest"]["name"], "from": save["source_host"],
                      "to": restore["destination_host"], "identical": same})
    failures += [f"save {j}: {done[j]['error'] if j in done else 'unfinished'}"
                 for j in saves if j not in done or done[j]["state"] != "succeeded"]
    save_s = [took(done[j]) for j in saves if j in done and done[j]["finished_at"]]
    restore_s = [took(done[j]) for j in restores if j in done and done[j]["finished_at"]]
    return {
        "saves": len(saves), "restores": len(restores), "identical": identical,
        "failures": failures[:20], "wall_s": round(wall, 1),
        "save_s": {"p50": round(percentile(save_s, 50), 2), "max": round(max(save_s), 2)}
        if save_s else None,
        "restore_s": {"p50": round(percentile(restore_s, 50), 2),
                      "max": round(max(restore_s), 2)} if restore_s else None,
        "moves": pairs, "load_average_before": load_before, "load_average_after": load_average(),
        "meets_target": identical == count and len(saves) == count and not failures,
    }


# --------------------------------------------------------------------------
# 3. list endpoints
def time_requests(api, path, n, **params):
    seconds = []
    for _ in range(n):
        t = time.perf_counter()
        response = api.http.get(path, params=params)
        seconds.append(time.perf_counter() - t)
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:200]}")
    return seconds, response.json()


def lists_phase(api, requests):
    load_before = load_average()
    out = {}
    for path in LISTS:
        time_requests(api, path, 5)  # warm: first-use imports and caches are not measured
        seconds, body = time_requests(api, path, requests)
        figures = summary_ms(seconds)
        out[path] = {**figures, "rows": body["count"], "page": len(body["results"]),
                     "meets_target": figures["p95"] <= TARGETS["list_p95_ms"]}
    # Informational: a deep page (page-number pagination is OFFSET underneath).
    for path, rows in (("/api/v1/audit/", out["/api/v1/audit/"]["rows"]),
                       ("/api/v1/images/", out["/api/v1/images/"]["rows"])):
        last = max(1, -(-rows // 50))
        seconds, _ = time_requests(api, path, max(5, requests // 5), page=last)
        out[path]["last_page"] = {"page": last, **summary_ms(seconds)}
    out["load_average_before"], out["load_average_after"] = load_before, load_average()
    return out


def verify_audit_chain():
    from portal import audit

    t = time.monotonic()
    result = audit.verify_chain()
    return {"ok": result.ok, "records": result.count, "reason": result.reason,
            "verify_s": round(time.monotonic() - t, 1)}


# --------------------------------------------------------------------------
def run(args, work: Path, database: str) -> dict:
    data_dir = work / "data"
    data_dir.mkdir()
    configure_django(data_dir)
    from portal.demo import ensure_demo_accounts
    from tests.support.server import PortalServer

    # On PostgreSQL the portal shares the bench's throwaway database (fixtures included).
    shared = {"DATABASE_URL": os.environ["DATABASE_URL"]} if database == "postgresql" else {}
    portal = PortalServer(data_dir, shared)
    per_host = -(-args.jobs // len(HOSTS))
    configs = enroll_hosts(portal.url, per_host, args.guest_mib, args.mover_mib)
    passwords = ensure_demo_accounts()
    token = issue_token()
    fixtures = bulk_fixtures(args.images, args.audit)
    report = {"database": database, "fixtures": fixtures}
    agents = None
    try:
        portal.start()
        agents = Agents(configs, portal.env, data_dir)
        api = Api(portal.url, token)
        wait_for(lambda: sum(h["online"] for h in api.get("/api/v1/hosts/")["results"])
                 == len(HOSTS), "four hosts online", 60, POLL_S)
        cookie = sign_in(portal.url, "auditor", passwords["auditor"])
        live = {"downtime_ms": args.downtime_ms}
        report["watchers"] = watchers_phase(portal, api, agents, cookie, args.watchers, live,
                                            deflate=not args.no_deflate)
        print("watchers:", json.dumps(report["watchers"]["latency_ms"]), file=sys.stderr)
        report["saves_and_restores"] = saves_and_restores(api, args.jobs)
        print("saves and restores:", report["saves_and_restores"]["wall_s"], "s",
              file=sys.stderr)
        report["lists"] = lists_phase(api, args.requests)
    finally:
        if agents:
            agents.stop()
        portal.stop()
    report["audit_chain"] = verify_audit_chain()
    from django.db import connections

    connections.close_all()  # before the throwaway database is dropped
    return report


def count(low, high):
    """An argparse type: an integer in [low, high], refused in one line otherwise."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value
    return parse


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=count(1, 2000), default=200)
    parser.add_argument("--jobs", type=count(1, 120), default=20, help="saves (and restores)")
    parser.add_argument("--images", type=count(0, 1_000_000), default=10_000)
    parser.add_argument("--audit", type=count(0, 10_000_000), default=100_000)
    parser.add_argument("--requests", type=count(1, 100_000), default=100,
                        help="per list endpoint")
    parser.add_argument("--guest-mib", type=count(16, 1024), default=64, help="each saved guest")
    parser.add_argument("--mover-mib", type=count(64, 4096), default=512,
                        help="the migrated guest")
    parser.add_argument("--downtime-ms", type=count(1, 60_000), default=50,
                        help="the migration's downtime target (more rounds, more events)")
    parser.add_argument("--no-deflate", action="store_true",
                        help="watchers do not offer permessage-deflate (browsers do)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="berth-load-") as tmp, \
            throwaway_database() as database:
        report = run(args, Path(tmp), database)
    report = {
        "benchmark": "load", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "channel_layer": "redis" if os.environ.get("BERTH_REDIS_URL")
                        else "in-memory", "portal_processes": 1,
                        "load_average_at_end": load_average()},
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS, **report}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    # Missed latency targets are figures to report; lost events, failed or differing
    # restores and a broken audit chain are faults: those fail the run.
    faults = [name for name, bad in (
        ("watchers missed events", report["watchers"]["complete"] != args.watchers),
        ("saves/restores failed or differ", report["saves_and_restores"]["identical"]
         != args.jobs),
        ("audit chain broken", not report["audit_chain"]["ok"])) if bad]
    print(f"written to {args.output}; faults: {', '.join(faults) or 'none'}", file=sys.stderr)
    if faults:
        sys.exit(1)


if __name__ == "__main__":
    main()
