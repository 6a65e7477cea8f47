"""Fuzz the HTTP API from its own served OpenAPI document with every
schemathesis check (what `schemathesis run --checks all` does: examples,
coverage, fuzzing and stateful phases), auth on, and expect no failure; and
nothing stored changes because of requests that never named it."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema

from api.app import create_app
from store.commands import Put
from store.config import config_from_mapping
from store.node import Store
from tests.helpers.apps import cluster_secret
from tests.ports import free_range
from tests.waiting import wait_until

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
SENTINEL = "sentinel-9f1c2e7a4b"
WRITE_TOKEN, READ_TOKEN = "fuzz-write-token", "fuzz-read-token"
AUTH = {"Authorization": f"Bearer {WRITE_TOKEN}"}
EXAMPLES_PER_OPERATION = 10
# Adding a member that does not exist (the schema describes valid records, so
# the fuzzer makes them) leaves the one replica under test without a quorum:
# every later case would see 503. test_openapi.py checks that route's schema.
NOT_FUZZED = {"path": "/v1/cluster/members", "method": "POST"}
ALL_CHECKS = {  # what `schemathesis run --checks all` runs (schemathesis 4.x)
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
    "object_level_authorization",
}


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory):
    base = free_range(4)
    cfg = config_from_mapping(
        {
            "cluster": {"shards": 2, "replication": 1},
            "nodes": [{"id": "n0", "http": f"127.0.0.1:{base}", "raft": f"127.0.0.1:{base + 1}"}],
            "node": {"id": "n0", "data_dir": str(tmp_path_factory.mktemp("fuzz"))},
            "raft": {"password": cluster_secret()},
            "limits": {"max_body_bytes": 1 << 20, "request_timeout": 1.0, "max_wait_seconds": 0.2},
            "auth": {"write_tokens": [WRITE_TOKEN], "read_tokens": [READ_TOKEN]},
        }
    )
    store = Store(cfg)
    store.start()
    wait_until(store.is_ready, 15, "fuzz replica ready")
    yield store
    store.close()


def run_schemathesis(app) -> tuple[dict, int, set[str]]:
    """Every phase and check of `schemathesis run --checks all`; returns the
    unique failures (check, operation, title) -> a curl line, the number of
    cases, and the paths that a write succeeded on."""
    with open(ROOT / "schemathesis.toml", "rb") as f:
        settings = tomllib.load(f)  # the settings a CLI run from the repository root uses
    settings.update(
        hooks=str(ROOT / settings["hooks"]),
        headers=AUTH,
        workers=1,
        generation={"max-examples": EXAMPLES_PER_OPERATION, "database": "none"},
    )
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app, headers=AUTH, config=SchemathesisConfig.from_dict(settings)
    )
    schema = schema.exclude(**NOT_FUZZED)
    failures: dict[tuple[str, str, str], str] = {}
    cases = 0
    written: set[str] = set()
    ran: set[str] = set()
    for event in from_schema(schema).execute():
        if isinstance(event, (events.NonFatalError, events.FatalError)):
            failures[("error", getattr(event, "label", ""), type(event).__name__)] = str(
                getattr(event, "value", None) or getattr(event, "exception", "")
            )
        if not isinstance(event, events.ScenarioFinished):
            continue
        for interaction in event.recorder.interactions.values():
            response = interaction.response
            if (
                interaction.request.method not in ("GET", "HEAD")
                and response is not None
                and 200 <= response.status_code < 300
            ):
                written.add(interaction.request.uri)
        for case_id, checks in event.recorder.checks.items():
            cases += 1
            for check in checks:
                ran.add(check.name)
                if check.failure_info is None:
                    continue
                case = event.recorder.cases[case_id].value
                failure = check.failure_info.failure
                status = getattr(event.recorder.interactions.get(case_id), "response", None)
                failures.setdefault(
                    (check.name, case.operation.label, failure.title),
                    f"[{getattr(status, 'status_code', '?')}] {failure.message}\n{case.as_curl_command()}",
                )
    print(f"{cases} cases; checks run: {', '.join(sorted(ran))}")
    assert ran >= ALL_CHECKS, f"checks that did not run: {sorted(ALL_CHECKS - ran)}"
    return failures, cases, written


def test_every_check_passes_on_every_operation(fuzz_store):
    value = np.arange(8, dtype=np.float32)
    fuzz_store.write(Put(name=SENTINEL, dtype="float32", shape=(8,), data=value.tobytes())).result(10)
    failures, cases, written = run_schemathesis(create_app(fuzz_store.cfg, fuzz_store))
    report = "\n".join(f"{check} {op}: {title}\n  {detail}" for (check, op, title), detail in sorted(failures.items()))
    assert not failures, f"{len(failures)} unique failures in {cases} cases:\n{report}"
    assert cases >= 500, f"only {cases} cases ran"
    # The stateful phase finds the sentinel through GET /v1/tensors and may
    # write it; unless a write to it succeeded, refused requests left it as it was.
    if not any(SENTINEL in uri or "mode=replace" in uri for uri in written):
        t, _ = fuzz_store.get(SENTINEL)
        assert (
            t.version == 1 and hashlib.sha256(t.value.tobytes()).digest() == hashlib.sha256(value.tobytes()).digest()
        ), "a refused request changed a tensor"
