"""What the job and file routes refuse, and how: a 4xx in the error envelope naming the field,
nothing stored or queued. Also the API key on every route, idempotent creation, cursor pages and
a cancel before any worker took the job. The API runs alone here (no worker)."""

import os
import pickle

import httpx
import pytest

NOTHING = {"object": "list", "data": [], "has_more": False}


@pytest.fixture
def api(deployment, tmp_path):
    d = deployment().start_api()
    with d.http() as http:
        yield d, http


def _refused(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code:
        assert error["code"] == code, error
    return error


def _upload(http, name: str, content: bytes, purpose: str = "train") -> httpx.Response:
    return http.post("/v1/files", data={"purpose": purpose}, files={"file": (name, content)})


def test_bad_specs_are_400s_naming_the_field_and_queue_nothing(api):
    d, http = api
    text = _upload(http, "a.txt", b"some training text").json()["id"]
    donor = {"type": "conversion", "donor": "org/model"}
    cases = [
        ({**donor, "mixer": "transformer"}, 400, "mixer", None),
        ({**donor, "bogus": 1}, 400, "bogus", "extra_forbidden"),
        ({"type": "distillation"}, 400, None, None),
        ({**donor, "training": {"training_file": text}}, 400, "training", None),  # no budget
        ({**donor, "training": {"training_file": text, "steps": 0}}, 400, "training.steps", None),
        ({**donor, "training": {"training_file": text, "steps": 5, "freeze": "sometimes"}}, 400,
         "training.freeze", None),
        ({**donor, "attention_layers": [1, 1]}, 400, "attention_layers", None),
        # the stage list: known names, in order, each with what it needs
        ({**donor, "stages": ["distill"], "training": {"training_file": text, "steps": 1}}, 400, "stages", None),
        ({**donor, "stages": ["train", "attention_transfer"], "training": {"training_file": text, "steps": 1},
          "attention_transfer": {"steps": 1}}, 400, "stages", None),
        ({**donor, "stages": ["train"]}, 400, "stages", None),  # no training section
        ({**donor, "stages": [], "training": {"training_file": text, "steps": 1}}, 400, "stages", None),  # unused
        ({**donor, "stages": ["attention_transfer", "train"], "training": {"training_file": text, "steps": 1}}, 400,
         "attention_transfer", None),  # no attention_transfer section
        ({**donor, "training": {"training_file": text, "steps": 1}, "attention_transfer": {"steps": 1}}, 400,
         "attention_transfer", None),  # a section for a stage not listed
        ({**donor, "stages": ["attention_transfer"], "attention_transfer": {"steps": 1}}, 400,
         "attention_transfer", None),  # no text, here or in training
        ({**donor, "stages": ["attention_transfer"], "attention_transfer": {"training_file": text}}, 400,
         "attention_transfer", None),  # no budget
        ({**donor, "stages": ["attention_transfer"], "attention_transfer": {"training_file": text, "steps": 1,
                                                                             "momentum": 0.9}}, 400,
         "attention_transfer.momentum", "extra_forbidden"),
        ({**donor, "stages": ["attention_transfer"], "attention_transfer": {"training_file": text, "steps": 0}}, 400,
         "attention_transfer.steps", None),
        ({**donor, "mixer": "attention", "stages": ["attention_transfer"],
          "attention_transfer": {"training_file": text, "steps": 1}}, 400, "stages", None),  # nothing converted
        ({**donor, "gpus": 2, "stages": ["attention_transfer"],
          "attention_transfer": {"training_file": text, "steps": 1}}, 400, "stages", None),  # one process
        ({**donor, "transfer": "none", "stages": ["attention_transfer"],
          "attention_transfer": {"training_file": text, "steps": 1}}, 400, "stages", None),  # no donor weights
        ({**donor, "attention_layers": [2], "stages": ["attention_transfer"],
          "attention_transfer": {"training_file": text, "steps": 1, "layers": [1, 2]}}, 400, "attention_transfer",
         None),  # layer 2 keeps attention
        ({**donor, "stages": ["attention_transfer"],
          "attention_transfer": {"training_file": "file-" + "0" * 24, "steps": 1}}, 404,
         "attention_transfer.training_file", "file_not_found"),
        ({"type": "fine_tune", "model": "m", "stages": ["attention_transfer"],
          "training": {"training_file": text, "steps": 1}}, 400, "stages", "extra_forbidden"),
        ({**donor, "name": "../escape"}, 400, "name", None),
        ({**donor, "precision": "int4"}, 400, "precision", None),  # the published weights: fp32, bf16 or int8
        ({**donor, "precision": "fp16"}, 400, "precision", None),  # a training precision, not a saved one
        ({"type": "fine_tune", "model": "m", "training": {"training_file": text, "steps": 1}, "precision": 8}, 400,
         "precision", None),
        ({"type": "conversion", "donor": "file-" + "0" * 24}, 404, "donor", "file_not_found"),
        ({"type": "conversion", "donor": "relative/../path.bin"}, 400, "donor", "invalid_reference"),
        ({"type": "conversion", "donor": "/etc/passwd"}, 400, "donor", "path_not_allowed"),
        ({"type": "conversion", "donor": text}, 400, "donor", "wrong_file_purpose"),
        ({"type": "fine_tune", "model": "no-such-model", "training": {"training_file": text, "steps": 1}},
         404, "model", "model_not_found"),
    ]
    for body, status, param, code in cases:
        _refused(http.post("/v1/jobs", json=body), status, param, code)
    _refused(http.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 400, None,
             "json_invalid")
    assert http.get("/v1/jobs").json() == NOTHING
    assert d.store.count_jobs() == 0


def test_paths_must_lie_under_an_import_root_and_links_out_of_it_count_as_outside(api, tmp_path):
    d, http = api
    root = d.settings.import_roots[0]
    (root / "donor.bin").write_bytes(b"x")
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.bin")
    _refused(http.post("/v1/jobs", json={"type": "conversion", "donor": str(root / "link.bin")}), 400, "donor",
             "path_not_allowed")
    _refused(http.post("/v1/jobs", json={"type": "conversion", "donor": str(root / ".." / "secret.bin")}), 400,
             "donor", "path_not_allowed")
    _refused(http.post("/v1/jobs", json={"type": "conversion", "donor": str(root / "missing.bin")}), 400, "donor",
             "file_not_found")
    accepted = http.post("/v1/jobs", json={"type": "conversion", "donor": str(root / "donor.bin")})
    assert accepted.status_code == 200 and accepted.json()["status"] == "queued"


def test_uploads_that_are_refused(api, tmp_path):
    d, http = api
    marker = tmp_path / "unpickled"

    class Plant:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _refused(_upload(http, "model.bin", pickle.dumps(Plant()), purpose="donor"), 400, "file", "pickle_refused")
    _refused(_upload(http, "text.txt", "café".encode("latin-1") + b" \xff\xfe"), 400, "file", "not_utf8")
    _refused(_upload(http, "rows.jsonl", b'{"text": "a"}\n[1, 2]\n'), 400, "file", "invalid_jsonl")
    _refused(_upload(http, "a.txt", b"x", purpose="everything"), 400, "purpose", "invalid_purpose")
    assert not marker.exists()
    assert http.get("/v1/files").json() == NOTHING
    assert list(d.settings.files_dir.iterdir()) == []  # nothing kept of a refused upload


def test_an_upload_over_the_size_limit_is_refused(deployment):
    d = deployment(max_upload_bytes=1000).start_api()
    with d.http() as http:
        _refused(_upload(http, "big.txt", b"a" * 5000), 413, "file", "file_too_large")
        assert http.get("/v1/files").json() == NOTHING


def test_every_job_and_file_route_needs_the_key(api):
    d, _ = api
    routes = [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/job-x"), ("POST", "/v1/jobs/job-x/cancel"),
              ("GET", "/v1/jobs/job-x/events"), ("GET", "/v1/jobs/job-x/checkpoints"),
              ("GET", "/v1/jobs/job-x/artifacts"), ("GET", "/v1/files"), ("POST", "/v1/files"),
              ("GET", "/v1/files/file-x"), ("DELETE", "/v1/files/file-x"), ("DELETE", "/v1/models/m")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.request(method, d.url + path, headers=headers)
            _refused(response, 401, None, "invalid_api_key")


def test_an_idempotency_key_makes_one_job(api):
    d, http = api
    body = {"type": "conversion", "donor": "org/model", "suffix": "once"}
    first = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc"}).json()
    again = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc"}).json()
    assert again["id"] == first["id"] and d.store.count_jobs() == 1
    _refused(http.post("/v1/jobs", json={**body, "mixer": "retention"}, headers={"Idempotency-Key": "abc"}), 409,
             "Idempotency-Key", "idempotency_key_reused")


def test_jobs_page_with_a_cursor_and_filter_by_status(api):
    d, http = api
    ids = [http.post("/v1/jobs", json={"type": "conversion", "donor": "org/model", "suffix": f"n{i}"}).json()["id"]
           for i in range(5)]
    page = http.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = http.get("/v1/jobs", params={"limit": 10, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    _refused(http.get("/v1/jobs", params={"after": "job-nope"}), 400, "after", "invalid_cursor")

    cancelled = http.post(f"/v1/jobs/{ids[0]}/cancel").json()  # no worker took it: cancelled at once
    assert cancelled["status"] == "cancelled"
    assert [j["id"] for j in http.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]] == [ids[0]]
    assert http.get(f"/v1/jobs/{ids[0]}/events").json()["data"][-1]["message"] == "cancelled before it started"
    _refused(http.get("/v1/jobs/job-nope"), 404, "job_id", "job_not_found")


def test_names_are_not_taken_twice_and_only_jobs_models_can_be_deleted(api):
    d, http = api
    (d.settings.resolved_models_dir / "by-hand").mkdir(parents=True)
    (d.settings.resolved_models_dir / "by-hand" / "config.json").write_text("{}")
    _refused(http.post("/v1/jobs", json={"type": "conversion", "donor": "org/model", "name": "by-hand"}), 409,
             "name", "model_exists")
    assert http.post("/v1/jobs", json={"type": "conversion", "donor": "org/m", "name": "new"}).status_code == 200
    _refused(http.post("/v1/jobs", json={"type": "conversion", "donor": "org/m", "name": "new"}), 409, "name",
             "model_exists")  # an unfinished job will publish it
    _refused(http.delete("/v1/models/by-hand"), 403, "model", "model_not_deletable")
    _refused(http.delete("/v1/models/absent"), 404, "model", "model_not_found")


def test_a_file_in_use_by_an_unfinished_job_stays(api):
    d, http = api
    text = _upload(http, "a.txt", b"text").json()["id"]
    job = http.post("/v1/jobs", json={"type": "conversion", "donor": "org/m",
                                      "training": {"training_file": text, "steps": 1}}).json()
    _refused(http.delete(f"/v1/files/{text}"), 409, "file_id", "file_in_use")
    http.post(f"/v1/jobs/{job['id']}/cancel")
    assert http.delete(f"/v1/files/{text}").json() == {"id": text, "object": "file", "deleted": True}
    _refused(http.get(f"/v1/files/{text}"), 404, "file_id", "file_not_found")


def test_a_conversion_lists_its_stages_and_the_default_follows_the_training_section(api):
    d, http = api
    text = _upload(http, "a.txt", b"some training text").json()["id"]
    training = {"training_file": text, "steps": 2}
    two = http.post("/v1/jobs", json={"type": "conversion", "donor": "org/m", "suffix": "two",
                                      "stages": ["attention_transfer", "train"], "training": training,
                                      "attention_transfer": {"steps": 3, "lr": 3e-3, "block_size": 64}})
    assert two.status_code == 200, two.text
    spec = two.json()["spec"]
    assert spec["stages"] == ["attention_transfer", "train"]
    assert spec["attention_transfer"]["steps"] == 3 and spec["attention_transfer"]["training_file"] is None
    trained = http.post("/v1/jobs", json={"type": "conversion", "donor": "org/m", "suffix": "t", "training": training})
    assert trained.json()["spec"]["stages"] == ["train"] and trained.json()["spec"]["attention_transfer"] is None
    alone = http.post("/v1/jobs", json={"type": "conversion", "donor": "org/m", "suffix": "c"})
    assert alone.json()["spec"]["stages"] == []  # a conversion alone
    assert alone.json()["spec"]["precision"] == "fp32"  # published as trained, by default
    int8 = http.post("/v1/jobs", json={"type": "conversion", "donor": "org/m", "suffix": "q", "precision": "int8"})
    assert int8.status_code == 200 and int8.json()["spec"]["precision"] == "int8", int8.text
    _refused(http.delete(f"/v1/files/{text}"), 409, "file_id", "file_in_use")
