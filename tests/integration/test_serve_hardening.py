"""Hostile requests against a Serve application with an API key, over real HTTP. Each case
asserts the status, the one error shape ({"error": ...}), and that nothing leaks (the key, the
registry's location, other models' names, tracebacks); the app keeps serving after all of them."""

import base64
import concurrent.futures as cf
import io
import json
import secrets
import socket

import numpy as np
import pytest
import requests
from PIL import Image

from helpers import CHROMIUM, launch_chromium, serve_registry
from latentforge.errors import ConfigError
from latentforge.serve.config import ServeConfig
from latentforge.serve.runner import check_exposure

KEY = secrets.token_urlsafe(24)
AUTH = {"X-API-Key": KEY}
# small budgets so that limits, the deadline and the queue can be reached by a test
CFG = {"replica_cpus": 0.2, "generator": {"min_replicas": 1, "max_replicas": 1},
       "editor": {"min_replicas": 1, "max_replicas": 1}, "projection_steps": 20, "projection_restarts": 1,
       "request_timeout_s": 2.0, "editor_max_queued": 1,
       "limits": {"max_projection_steps": 100000, "max_projection_work": 100000, "max_body_bytes": 65536}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_b64(fmt: str, mode: str = "L", size=(28, 28)) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]) + (() if mode == "L" else (3,)), 128, np.uint8)).convert(mode).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


EPS = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 0 0 moveto 28 28 lineto stroke\n"
                       b"showpage\n%%EOF\n").decode()


@pytest.fixture(scope="module")
def registry(mnist_dir, tmp_path_factory):
    return serve_registry(tmp_path_factory.mktemp("hardening"), mnist_dir)


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    import ray
    from ray import serve

    from latentforge.serve.runner import start_serve

    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")  # as a mounted Secret would hold it
    if ray.is_initialized():
        ray.shutdown()
    url = start_serve(ServeConfig.model_validate({"registry": registry, "api_key_file": str(key_file), **CFG}),
                      port=free_port(), num_cpus=4)
    yield url
    serve.shutdown()
    ray.shutdown()


def call(server, method, path, body=None, headers=None, raw=None):
    h = {"content-type": "application/json", **(headers or {})}
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    return requests.request(method, f"{server}{path}", data=data, headers=h, timeout=120)


def check_error(r, status, message, registry):
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert message.lower() in body["error"].lower(), body
    for secret in (KEY, registry, "Traceback"):
        assert secret not in r.text, (secret, r.text[:300])


SEED = {"seed": 1}
CASES = [
    # (name, method, path, body or raw bytes, headers, status, message)
    ("no key", "GET", "/v1/models", None, {}, 401, "API key"),
    ("no key, absurd n", "POST", "/v1/models/gan/generate", {"n": 10**9}, {}, 401, "API key"),
    ("no key, broken JSON", "POST", "/v1/models/gan/generate", b"{", {}, 401, "API key"),
    ("no key, unknown model", "POST", "/v1/models/secret-model/generate", {"n": 1}, {}, 401, "API key"),
    ("no key, huge body", "POST", "/v1/models/gan/generate", b"{" + b" " * 200000 + b"}", {}, 401, "API key"),
    ("wrong key", "GET", "/v1/models", None, {"X-API-Key": "x" * 32}, 401, "API key"),
    ("bearer, no token", "GET", "/v1/models", None, {"Authorization": "Bearer "}, 401, "API key"),
    ("basic scheme", "GET", "/v1/models", None, {"Authorization": f"Basic {KEY}"}, 401, "API key"),
    ("no key, contract", "GET", "/openapi.json", None, {}, 401, "API key"),
    ("no key, directions", "GET", "/v1/models/gan/directions", None, {}, 401, "API key"),
    ("trailing newline id", "POST", "/v1/models/gan%0A/generate", {"n": 1}, AUTH, 400, "invalid model name"),
    ("upper-case id", "POST", "/v1/models/GAN/generate", {"n": 1}, AUTH, 400, "invalid model name"),
    ("65-char id", "POST", f"/v1/models/{'a' * 65}/generate", {"n": 1}, AUTH, 400, "invalid model name"),
    ("traversal id", "POST", "/v1/models/a..b/generate", {"n": 1}, AUTH, 400, "invalid model name"),
    ("unknown id", "POST", "/v1/models/nope/generate", {"n": 1}, AUTH, 404, "GET /v1/models lists"),
    ("n is a boolean", "POST", "/v1/models/gan/generate", {"n": True}, AUTH, 422, "n:"),
    ("n is a string", "POST", "/v1/models/gan/generate", {"n": "3"}, AUTH, 422, "n:"),
    ("seed is a float", "POST", "/v1/models/gan/generate", {"seed": 1.5}, AUTH, 422, "seed"),
    ("include_latents is 1", "POST", "/v1/models/gan/generate", {"include_latents": 1}, AUTH, 422, "include_latents"),
    ("truncation is a string", "POST", "/v1/models/gan/generate", {"truncation": "0.5"}, AUTH, 422, "truncation"),
    ("alpha is a boolean", "POST", "/v1/models/gan/edit", {"source": SEED, "direction": "sefa:0", "alpha": True}, AUTH,
     422, "alpha"),
    ("latent of strings", "POST", "/v1/models/gan/edit", {"source": {"latent": ["1"]}, "direction": "sefa:0", "alpha": 1},
     AUTH, 422, "latent"),
    ("n above the limit", "POST", "/v1/models/gan/generate", {"n": 10**9}, AUTH, 422, "limit"),
    ("EPS image", "POST", "/v1/models/vae/reconstruct", {"image": EPS}, AUTH, 422, "PNG or JPEG"),
    ("GIF image", "POST", "/v1/models/vae/reconstruct", {"image": image_b64("GIF")}, AUTH, 422, "PNG or JPEG"),
    ("BMP image", "POST", "/v1/models/vae/reconstruct", {"image": image_b64("BMP")}, AUTH, 422, "PNG or JPEG"),
    ("TIFF image", "POST", "/v1/models/vae/reconstruct", {"image": image_b64("TIFF")}, AUTH, 422, "PNG or JPEG"),
    ("orthogonal to itself", "POST", "/v1/models/gan/edit",
     {"source": {"seed": 1, "label": 0}, "direction": "sefa:0", "alpha": 1, "orthogonal_to": ["sefa:0"]}, AUTH, 422, "itself"),
    ("orthogonal twice", "POST", "/v1/models/gan/edit",
     {"source": {"seed": 1, "label": 0}, "direction": "sefa:0", "alpha": 1, "orthogonal_to": ["sefa:1", "sefa:1"]},
     AUTH, 422, "more than once"),
    ("unknown direction", "POST", "/v1/models/gan/edit",
     {"source": {"seed": 1, "label": 0}, "direction": "nope", "alpha": 1}, AUTH, 422, "unknown direction"),
    ("over the projection budget", "POST", "/v1/models/gan/interpolate",
     {"a": {"image": image_b64("PNG"), "label": 0}, "b": {"image": image_b64("PNG"), "label": 1}, "projection_steps": 60000},
     AUTH, 422, "limit per request"),
    ("steps above the limit", "POST", "/v1/models/gan/reconstruct", {"image": image_b64("PNG"), "label": 0, "steps": 200000},
     AUTH, 422, "above the limit"),
    ("unknown route", "GET", "/v2/everything", None, AUTH, 404, "no route"),
    ("wrong method", "DELETE", "/v1/models", None, AUTH, 405, "not allowed"),
    ("malformed JSON", "POST", "/v1/models/gan/generate", b'{"n": ', AUTH, 422, "JSON"),
    # the JSON decoder's own limits, which FastAPI answered 400 "error parsing the body"
    ("5000-digit integer", "POST", "/v1/models/gan/generate", b'{"n": 1, "seed": ' + b"9" * 5000 + b"}", AUTH, 422,
     "number too long"),
    ("nesting past the recursion limit", "POST", "/v1/models/gan/generate", b'{"n": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     AUTH, 422, "nesting too deep"),
    ("label the model lacks", "POST", "/v1/models/gan/generate", {"n": 1, "label": 99}, AUTH, 422, "out of range"),
    ("sized body over the limit", "POST", "/v1/models/gan/generate", b"{" + b" " * 70000 + b"}", AUTH, 413, "limit"),
    ("unknown field", "POST", "/v1/models/gan/generate", {"n": 1, "bogus": 1}, AUTH, 422, "bogus"),
    ("NaN alpha", "POST", "/v1/models/gan/edit", b'{"source": {"seed": 1, "label": 0}, "direction": "sefa:0", "alpha": NaN}',
     AUTH, 422, "alpha"),
]


def test_hostile_requests_get_one_error_shape_and_leak_nothing(server, registry):
    for name, method, path, body, headers, status, message in CASES:
        raw = body if isinstance(body, bytes) else None
        r = call(server, method, path, None if raw is not None else body, headers, raw=raw)
        try:
            check_error(r, status, message, registry)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
        if status == 401:
            assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), name
    # a chunked body over the limit is refused like a sized one
    chunked = requests.post(f"{server}/v1/models/gan/generate", data=(b" " * 8192 for _ in range(10)),
                            headers={"content-type": "application/json", **AUTH}, timeout=60)
    check_error(chunked, 413, "limit", registry)
    # and the app still serves
    assert call(server, "GET", "/healthz").json()["status"] == "ok"
    assert len(call(server, "POST", "/v1/models/gan/generate", {"n": 2, "seed": 1}, AUTH).json()["images"]) == 2


def test_the_key_is_accepted_in_every_documented_form_and_public_routes_need_none(server, registry):
    for headers in (AUTH, {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"},
                    {"Authorization": f"BEARER   {KEY}"}):
        r = call(server, "GET", "/v1/models", headers=headers)
        assert r.status_code == 200, (headers.keys(), r.text[:200])
    assert call(server, "GET", "/healthz").status_code == 200
    page = requests.get(f"{server}/", timeout=30)
    assert page.status_code == 200 and 'id="api-key"' in page.text
    contract = call(server, "GET", "/openapi.json", headers=AUTH)
    assert contract.status_code == 200
    doc = contract.json()
    for path, item in doc["paths"].items():  # every status a model route can answer is in the contract
        if path.startswith("/v1/models/{model_id}/"):
            op = next(iter(item.values()))
            assert {"400", "401", "404", "413", "422", "503", "504"} <= set(op["responses"]), path
            assert op["responses"]["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
            assert op["parameters"][0]["schema"]["pattern"] == "^[a-z0-9][a-z0-9._-]{0,63}$"
    assert call(server, "GET", "/readyz").status_code == 401
    ready = call(server, "GET", "/readyz", headers=AUTH)
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["models"] >= 3
    assert ready.json()["loaded"] in {m["id"] for m in call(server, "GET", "/v1/models", headers=AUTH).json()["models"]}
    # a JPEG (documented) is decoded
    r = call(server, "POST", "/v1/models/vae/reconstruct", {"image": image_b64("JPEG")}, AUTH)
    assert r.status_code == 200, r.text[:200]


def test_models_list_exposes_no_server_paths(server, registry):
    models = call(server, "GET", "/v1/models", headers=AUTH).json()["models"]
    assert {"gan", "vae", "resnet"} <= {m["id"] for m in models}
    text = json.dumps(models)
    assert registry not in text and "source_checkpoint" not in text and '"/' not in text


def test_a_request_past_the_deadline_is_stopped_with_504_and_the_editor_recovers(server, registry):
    png = image_b64("PNG")
    assert call(server, "GET", "/v1/models/gan/directions", headers=AUTH).status_code == 200  # the model is loaded
    r = call(server, "POST", "/v1/models/gan/reconstruct", {"image": png, "label": 0, "steps": 90000}, AUTH)
    check_error(r, 504, "deadline", registry)
    ok = call(server, "POST", "/v1/models/gan/reconstruct", {"image": png, "label": 0, "steps": 5}, AUTH)
    assert ok.status_code == 200, ok.text[:200]


def test_a_full_edit_queue_sheds_load_with_503_and_retry_after(server, registry):
    png = image_b64("PNG")
    body = {"image": png, "label": 0, "steps": 3000}  # long (seconds), under the budget
    with cf.ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(call, server, "POST", "/v1/models/gan/reconstruct", body, AUTH) for _ in range(6)]
        import time

        time.sleep(1.0)  # the Editor is busy and its queue full now
        # edits and interpolations of seeds invert nothing: they never wait behind projections
        edit = call(server, "POST", "/v1/models/gan/edit", {"source": SEED, "direction": "sefa:0", "alpha": 1}, AUTH)
        dirs = call(server, "GET", "/v1/models/gan/directions", headers=AUTH)  # what the playground asks first
        path = call(server, "POST", "/v1/models/gan/interpolate", {"a": SEED, "b": {"seed": 2, "label": 1}, "steps": 3}, AUTH)
        still_busy = not all(f.done() for f in pending)
        answers = [f.result() for f in pending]
    assert edit.status_code == 200 and len(edit.json()["images"]) == 1, edit.text[:200]
    assert dirs.status_code == 200 and dirs.json()["directions"], dirs.text[:200]
    assert path.status_code == 200 and len(path.json()["images"]) == 3, path.text[:200]
    assert still_busy  # they were answered while the projections ran
    codes = [a.status_code for a in answers]
    assert 503 in codes and set(codes) <= {200, 503, 504}, codes
    busy = next(a for a in answers if a.status_code == 503)
    check_error(busy, 503, "busy", registry)
    assert int(busy.headers["retry-after"]) > 0
    assert call(server, "POST", "/v1/models/gan/generate", {"n": 1}, AUTH).status_code == 200


def test_a_model_that_fails_to_load_is_unavailable_and_the_others_keep_serving(server, registry):
    import shutil
    import time
    from pathlib import Path

    broken = Path(registry) / "broken"
    shutil.copytree(Path(registry) / "gan", broken)
    entry = json.loads((broken / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({**entry, "name": "broken"}))
    (broken / "checkpoint" / "model.safetensors").write_bytes(b"\0" * 64)  # corrupt weights
    time.sleep(2.5)  # the gateway's registry_refresh_s
    try:
        _broken_model_is_unavailable(server, registry)
    finally:
        shutil.rmtree(broken)  # leave the registry as the other tests expect it


def _broken_model_is_unavailable(server, registry):
    import time

    for path, body in (("generate", {"n": 1}), ("edit", {"source": SEED, "direction": "sefa:0", "alpha": 1})):
        first = call(server, "POST", f"/v1/models/broken/{path}", body, AUTH)
        check_error(first, 503, "unavailable", registry)
        t = time.monotonic()
        again = call(server, "POST", f"/v1/models/broken/{path}", body, AUTH)
        check_error(again, 503, "tried again in", registry)  # the negative cache answers, no reload
        assert time.monotonic() - t < 5
    ready = call(server, "GET", "/readyz", headers=AUTH)  # "broken" sorts first: readiness moves on to a model that loads
    assert ready.status_code == 200 and ready.json()["loaded"] not in (None, "broken"), ready.text[:200]
    assert call(server, "POST", "/v1/models/gan/generate", {"n": 1, "label": 0}, AUTH).status_code == 200
    assert call(server, "POST", "/v1/models/gan/edit", {"source": {"seed": 1, "label": 0}, "direction": "sefa:0",
                                                        "alpha": 1}, AUTH).status_code == 200


def test_a_damaged_entry_is_the_servers_fault_and_a_nan_metric_does_not_break_the_list(server, registry):
    """A damaged model.json answers 503 naming the model, not 400 with the registry's location;
    an entry whose metrics hold NaN (written before promote stored them as null) still lists."""
    import shutil
    import time
    from pathlib import Path

    damaged, nan = Path(registry) / "damaged", Path(registry) / "nan-metrics"
    damaged.mkdir()
    (damaged / "model.json").write_text("{")
    shutil.copytree(Path(registry) / "gan", nan)
    entry = json.loads((nan / "model.json").read_text())
    (nan / "model.json").write_text(json.dumps({**entry, "name": "nan-metrics", "metrics": {"fid": float("nan")}}))
    time.sleep(2.5)  # the gateway's registry_refresh_s
    try:
        r = call(server, "POST", "/v1/models/damaged/generate", {"n": 1}, AUTH)
        check_error(r, 503, "'damaged' is unavailable: its registry entry is damaged", registry)
        listed = call(server, "GET", "/v1/models", headers=AUTH)
        assert listed.status_code == 200, listed.text[:300]
        by_id = {m["id"]: m for m in listed.json()["models"]}
        assert by_id["nan-metrics"]["metrics"] == {"fid": None} and "damaged" not in by_id
    finally:
        shutil.rmtree(damaged)
        shutil.rmtree(nan)


def test_configuration_mistakes_fail_before_serving(tmp_path):
    with pytest.raises(ValueError, match="max_batch_images"):
        ServeConfig.model_validate({"max_batch_images": 8, "limits": {"max_n": 64}})
    with pytest.raises(ValueError, match="one of api_key"):
        ServeConfig.model_validate({"api_key": KEY, "api_key_env": "X"})
    with pytest.raises(ConfigError, match="without an API key"):
        check_exposure(ServeConfig(), "0.0.0.0")
    check_exposure(ServeConfig(), "0.0.0.0", allow_unauthenticated=True)  # explicitly allowed
    with pytest.raises(ConfigError, match="every interface"):  # its replica ports are not on loopback
        check_exposure(ServeConfig(), "127.0.0.1", request_path="haproxy")
    check_exposure(ServeConfig(api_key=KEY), "127.0.0.1", request_path="haproxy")
    with pytest.raises(ConfigError, match="cannot be read"):
        check_exposure(ServeConfig(api_key_file=str(tmp_path / "missing")), "127.0.0.1")
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="shorter than 16"):
        check_exposure(ServeConfig(api_key_file=str(tmp_path / "short")), "127.0.0.1")
    cfg = ServeConfig(api_key=KEY)
    assert KEY not in cfg.model_dump_json() and KEY not in repr(cfg) and cfg.replica_args()["api_key"] == KEY
    from latentforge.jobs import DeployJob

    job = DeployJob.model_validate({"serve": {"api_key": KEY}})
    assert KEY not in job.model_dump_json()  # what the deploy job prints back


@pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason="Debian's chromium is not installed (make browser-deps)")
def test_the_playground_asks_for_the_key_and_works_with_it(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server + "/")
        page.wait_for_function("document.querySelector('#error').textContent.includes('API key')", timeout=60000)
        assert page.locator("#model option").count() == 0  # nothing loaded without the key
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length >= 3", timeout=60000)
        page.select_option("#model", "gan")
        page.wait_for_function("document.querySelectorAll('#sliders input').length > 0", timeout=60000)
        page.click("#generate")
        try:
            page.wait_for_function("document.querySelectorAll('#grid img').length > 0", timeout=60000)
        except Exception as e:  # say what the page showed
            raise AssertionError(f"no images; the page says: {page.text_content('#error')!r} / {page.text_content('#status')!r}") from e
        assert KEY not in page.url
        page.reload()  # the key is remembered for this tab only
        page.wait_for_function("document.querySelectorAll('#model option').length >= 3", timeout=60000)
        browser.close()


def test_the_openapi_contract_holds_under_schemathesis(server, tmp_path):
    """Property-based requests from /openapi.json (schemathesis 4, every check, positive and
    negative data, seeded): every status is documented, every body matches its schema, schema-
    invalid requests are refused, authentication is not ignored, and no 5xx but the documented
    503/504 (tests/integration/schemathesis.toml says why those two)."""
    import subprocess
    import sys
    from pathlib import Path

    config = Path(__file__).with_name("schemathesis.toml")
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
           f"{server}/openapi.json", "--checks", "all", "--mode", "all", "--max-examples", "12", "--seed", "7",
           "--workers", "1", "--suppress-health-check", "all", "--request-timeout", "60",
           "--header", f"X-API-Key: {KEY}", "--report", "junit", "--report-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    import re

    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts and int(counts[1]) >= 500 and counts[1] == counts[2], out[-3000:]  # hundreds of requests, all good
    r = call(server, "POST", "/v1/models/gan/generate", {"n": 1, "label": 0}, AUTH)
    assert r.status_code == 200  # still serving
