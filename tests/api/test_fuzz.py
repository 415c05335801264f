"""Fuzz every API operation from the published OpenAPI schema (schemathesis) against the
real portal (uvicorn, as `make demo` runs it), with an admin token carrying every scope.

The portal runs without agents: hosts are enrolled but offline, there are no guests or
images, so fuzzed identifiers find nothing and nothing real is saved, migrated, restored
or deleted; no operation needs excluding. Tokens the fuzzer issues belong to this
throw-away deployment. Rate limits are lifted for this server only, so the checks see the
API's own answers rather than 429s.
"""
import hashlib
import time

import pytest

from portal.scopes import SCOPES
from tests.support.server import PortalServer, manage

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402
from schemathesis.transport.serialization import serialize_binary  # noqa: E402

EXAMPLES = 10
BUDGET_SECONDS = 90


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    server = PortalServer(tmp_path_factory.mktemp("berth-fuzz"), {
        "BERTH_API_RATE_ANON": "100000/min", "BERTH_API_RATE_USER": "100000/min",
        "BERTH_API_RATE_TOKEN_ISSUE": "100000/hour"})
    try:
        server.start()
        manage("demo", "--setup-only", "--port", str(server.port), env=server.env)
        out = manage("tokens", "issue", "admin", *sum((["--scope", s] for s in SCOPES), []),
                     env=server.env).stdout
        server.token = out.split("token: ")[1].split()[0]
        yield server
    finally:
        server.stop()


def fuzz(server, checks, modes, prepare=lambda case: None):
    """Run ``checks`` on EXAMPLES generated requests per operation and mode (each first
    passed to ``prepare``); return the failures, one entry per operation, with
    schemathesis's request/response/curl report."""
    auth = {"Authorization": f"Token {server.token}"}
    schema = schemathesis.openapi.from_url(f"{server.url}/api/schema/?format=json",
                                           headers=auth, timeout=30)
    failures, operations = [], 0
    deadline = time.monotonic() + BUDGET_SECONDS
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in modes:

            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def one(case):
                prepare(case)
                case.call_and_validate(base_url=server.url, headers=auth, timeout=15,
                                       checks=checks)

            try:
                one()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to get wrong, e.g. no input
            except (Exception, BaseExceptionGroup) as exc:  # run all; report all at once
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}):"
                                f"\n{exc}")
            assert time.monotonic() < deadline, "the fuzz run is over its time budget"
    assert operations >= 20, "the schema lost operations"
    return failures


def test_no_server_errors_and_responses_match_the_schema(fuzz_server):
    failures = fuzz(fuzz_server, [st_checks.not_a_server_error,
                                  st_checks.response_schema_conformance,
                                  st_checks.content_type_conformance],
                    [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    assert not failures, "\n\n".join(failures)


def digest_agrees_with_body(case):
    """An upload's X-Berth-SHA256 must be its body's digest: a relation no schema states
    (a wrong one is refused with 422, as documented), so valid data has the right one."""
    if case.headers and "X-Berth-SHA256" in case.headers:
        body = serialize_binary(case.body)  # the bytes schemathesis will send
        case.headers["X-Berth-SHA256"] = hashlib.sha256(body).hexdigest()


def test_status_codes_are_documented_and_valid_requests_accepted(fuzz_server):
    failures = fuzz(fuzz_server, [st_checks.status_code_conformance,
                                  st_checks.positive_data_acceptance],
                    [GenerationMode.POSITIVE], prepare=digest_agrees_with_body)
    assert not failures, "\n\n".join(failures)
