"""schemathesis against the service's own OpenAPI schema, every route, with a valid key and real
names (a served model, stored jobs and files) so that generation, jobs and files are reached, not
only refused: positive cases (valid by the schema) and negative ones (invalid on purpose). What must
hold for every case: no server error, and a response the schema describes (status, content type,
body), and invalid data refused. `XATL_FUZZ_EXAMPLES` sets the examples per route and mode (CI: a few; the reliability
benchmark: enough for 5,000 cases or more), and `XATL_FUZZ_REPORT` names a JSON-lines file that gets each
mode's tally (cases, statuses, server errors, schema violations) for the benchmark's table."""

import json
import os
import random
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from service_fixtures import API_KEY, save_tiny_model

from service.config import Settings
from service.main import create_app
from worker.store import migrate

EXAMPLES = int(os.environ.get("XATL_FUZZ_EXAMPLES", "12"))
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(autouse=True)
def denormals_kept():
    """The library flushes denormals on the CPU (for speed, in `xatl.loader.pick_device`); an earlier
    test in this process may have left that on, and it breaks hypothesis's float generation."""
    import torch

    flushing = _flushing(1e-310)
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(flushing)


def _flushing(denormal: float) -> bool:
    return denormal * 1.0 == 0.0  # zero only while the CPU flushes denormals


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tokenizer):
    data = tmp_path_factory.mktemp("fuzz")
    save_tiny_model(data / "models" / "tiny-gla", ["gla", "attention"], tokenizer)
    settings_ = Settings(api_keys=[API_KEY], home=data, max_prompt_tokens=64, max_tokens=32,
                         max_batch_size=4, torch_threads=1, max_upload_bytes=1 << 16, max_request_bytes=1 << 16)
    migrate(settings_.resolved_database_url)
    app = create_app(settings_)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # real names for the generated requests to hit now and then
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        text = client.post("/v1/files", headers=AUTH, data={"purpose": "train"},
                           files={"file": ("a.txt", b"some text")}).json()["id"]
        job = client.post("/v1/jobs", headers=AUTH, json={"type": "conversion", "donor": "org/model"}).json()["id"]
        yield app, schema, {"model": "tiny-gla", "file_id": text, "job_id": job}


def _realistic(case, names: dict, rng: random.Random) -> None:
    """Put a real model, file or job name into half of the cases that take one."""
    if rng.random() < 0.5:
        return
    for key, value in names.items():
        if case.path_parameters and key in case.path_parameters:
            case.path_parameters[key] = value
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = names["model"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_server_error_and_every_response_is_described(fuzzed, mode):
    app, schema, names = fuzzed
    rng = random.Random(0)
    statuses: Counter = Counter()
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy(generation_mode=mode))
        def run(case):
            _realistic(case, names, rng)
            response = case.call(headers=AUTH)
            statuses[response.status_code] += 1
            try:
                # every check but "valid by the schema, so accepted": token ids beyond the vocabulary, a file
                # that is not UTF-8 or a donor that does not exist are valid JSON the server rightly refuses
                case.validate_response(response, excluded_checks=[positive_data_acceptance])
            except Exception as error:  # noqa: BLE001 (collected, then reported together)
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                f"{str(error).splitlines()[0][:300]}")

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid: a route without parameters or body, in negative mode
            assert mode == GenerationMode.NEGATIVE, operation.path
    if os.environ.get("XATL_FUZZ_REPORT"):
        with open(os.environ["XATL_FUZZ_REPORT"], "a") as out:
            out.write(json.dumps({"mode": mode.name.lower(), "examples_per_route": EXAMPLES,
                                  "operations": len(operations), "cases": sum(statuses.values()),
                                  "statuses": {str(k): v for k, v in sorted(statuses.items())},
                                  "server_errors": sum(v for k, v in statuses.items() if k >= 500),
                                  "schema_violations": len(failures), "first_violations": failures[:5]}) + "\n")
    assert failures == [], "\n".join(failures[:20])
    assert not any(status >= 500 for status in statuses), statuses
    assert sum(statuses.values()) >= EXAMPLES  # it ran
    assert statuses[200] > 0 if mode == GenerationMode.POSITIVE else any(400 <= s < 500 for s in statuses)
