"""The Serve application on a local cluster, over real HTTP: every endpoint, determinism,
agreement with the editing engine, a bad-input suite that leaves the app serving, autoscaling up
and down, and a killed replica being replaced."""

import base64
import concurrent.futures as cf
import io
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from helpers import CHROMIUM, launch_chromium, serve_registry
from latentforge.registry import local_checkpoint
from latentforge.serve.config import ServeConfig

SMALL = {"replica_cpus": 0.2, "generator": {"min_replicas": 1, "max_replicas": 1},
         "editor": {"min_replicas": 1, "max_replicas": 1}, "projection_steps": 30, "projection_restarts": 1}


def b64png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(mnist_dir, tmp_path_factory):
    return serve_registry(tmp_path_factory.mktemp("serve"), mnist_dir)


@pytest.fixture(scope="module")
def server(registry):
    import ray
    from ray import serve

    from latentforge.serve.runner import start_serve

    if ray.is_initialized():
        ray.shutdown()
    url = start_serve(ServeConfig.model_validate({"registry": registry, **SMALL}), port=free_port(), num_cpus=4)
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def digit(mnist_dir):
    from latentforge.data import PreparedDataset

    return PreparedDataset(mnist_dir).load("val").images[0, 0].numpy()


def post(url, path, body, **kw):
    return requests.post(f"{url}{path}", json=body, timeout=120, **kw)


def test_every_endpoint(server, digit):
    assert requests.get(f"{server}/healthz", timeout=30).json()["status"] == "ok"
    models = {m["id"]: m for m in requests.get(f"{server}/v1/models", timeout=30).json()["models"]}
    assert set(models) == {"gan", "vae", "resnet", "stylegan"} and models["gan"]["num_classes"] == 10 and "edit" in models["vae"]["supports"]
    assert models["vae"]["latent_prior"] == "gmm-40" and models["gan"]["latent_prior"] == "standard"  # what seeds draw from
    # the latents' size and space, as docs/models.md says a client reads them
    assert models["stylegan"]["latent_space"] == "w" and models["gan"]["latent_space"] == "z"
    assert models["gan"]["z_dim"] > 0 and models["stylegan"]["z_dim"] > 0
    assert requests.get(f"{server}/openapi.json", timeout=30).json()["info"]["title"] == "LatentForge"
    assert requests.get(f"{server}/docs", timeout=30).status_code == 200
    g = post(server, "/v1/models/gan/generate", {"n": 4, "seed": 3, "label": 2}).json()
    assert len(g["images"]) == 4 and g["labels"] == [2] * 4 and decode(g["images"][0]).shape == (28, 28)
    dirs = requests.get(f"{server}/v1/models/gan/directions", timeout=60).json()["directions"]
    assert dirs and all({"name", "method"} <= set(d) for d in dirs)
    img = b64png(digit)
    mask = np.zeros((28, 28), np.uint8)
    mask[8:20, 8:20] = 255
    for model, path, body in [
        ("vae", "reconstruct", {"image": img}),
        ("gan", "reconstruct", {"image": img, "label": 7, "steps": 20}),
        ("vae", "interpolate", {"a": {"image": img}, "b": {"seed": 5}, "steps": 4}),
        ("gan", "interpolate", {"a": {"seed": 1, "label": 1}, "b": {"seed": 2, "label": 9}, "steps": 4, "method": "lerp"}),
        ("vae", "edit", {"source": {"image": img}, "direction": "sefa:0", "alpha": 2.0}),
        ("gan", "edit", {"source": {"seed": 4, "label": 3}, "direction": dirs[0]["name"], "alpha": -2.0}),
        ("vae", "inpaint", {"image": img, "mask": b64png(mask), "method": "chain"}),
        ("gan", "inpaint", {"image": img, "mask": b64png(mask), "label": 7, "steps": 20}),
        ("vae", "denoise", {"image": img}),
        ("resnet", "generate", {"n": 2, "seed": 1}),
        ("resnet", "edit", {"source": {"seed": 4}, "direction": "sefa:0", "alpha": 2.0}),
        ("resnet", "interpolate", {"a": {"seed": 1}, "b": {"seed": 2}, "steps": 3}),
        ("stylegan", "generate", {"n": 2, "seed": 1, "truncation": 0.7}),
        ("stylegan", "edit", {"source": {"seed": 4}, "direction": "sefa:0", "alpha": 2.0}),
        ("stylegan", "reconstruct", {"image": img, "steps": 10}),
    ]:
        r = post(server, f"/v1/models/{model}/{path}", body)
        assert r.status_code == 200, (model, path, r.text)
        assert r.json()["images"], (model, path)
    png = post(server, "/v1/models/gan/generate", {"n": 1, "seed": 3, "label": 2}, headers={"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png" and png.headers["x-latentforge-seed"] == "3"
    # the first image of a seed does not depend on n (up to float rounding between batch sizes)
    diff = np.abs(np.asarray(Image.open(io.BytesIO(png.content))).astype(int) - decode(g["images"][0]).astype(int))
    assert diff.max() <= 1, diff.max()


def test_same_seed_same_images_and_results_match_the_engine(server, registry, digit):
    from latentforge.serve.engine import ModelRuntime
    from latentforge.serve.schemas import ImageRequest, InpaintRequest

    a = post(server, "/v1/models/gan/generate", {"n": 8, "seed": 11}).json()
    b = post(server, "/v1/models/gan/generate", {"n": 8, "seed": 11}).json()
    assert a["images"] == b["images"] and a["latents"] == b["latents"]
    engine = ModelRuntime("vae", local_checkpoint(registry, "vae"))
    served = post(server, "/v1/models/vae/reconstruct", {"image": b64png(digit)}).json()
    assert served["images"] == engine.reconstruct(ImageRequest(image=b64png(digit)))["images"]
    mask = np.zeros((28, 28), np.uint8)
    mask[:, 14:] = 255
    body = {"image": b64png(digit), "mask": b64png(mask), "method": "chain"}
    assert post(server, "/v1/models/vae/inpaint", body).json()["images"] == engine.inpaint(InpaintRequest(**body))["images"]


def test_a_model_promoted_while_serving_is_found_after_the_refresh_window(server, registry):
    """The gateway keeps what it read about an id for registry_refresh_s (default 2 s), unknown ids
    included; a newly promoted model must still become servable without a restart."""
    from latentforge.registry import promote

    missing = post(server, "/v1/models/late/generate", {"n": 1, "seed": 0})
    assert missing.status_code == 404 and "late" in missing.json()["error"]
    promote(local_checkpoint(registry, "gan"), registry, "late")
    deadline = time.time() + 30
    while (r := post(server, "/v1/models/late/generate", {"n": 2, "seed": 5})).status_code == 404:
        assert time.time() < deadline, "the promoted model never became servable"
        time.sleep(0.5)
    assert r.status_code == 200
    assert r.json()["images"] == post(server, "/v1/models/gan/generate", {"n": 2, "seed": 5}).json()["images"]
    # promoted again over it (--overwrite): the replica that holds the old copy in its cache loads
    # the new one (before, it served the old weights for as long as it kept them)
    promote(local_checkpoint(registry, "stylegan"), registry, "late", overwrite=True)
    want = post(server, "/v1/models/stylegan/generate", {"n": 2, "seed": 5}).json()["images"]
    deadline = time.time() + 30
    while post(server, "/v1/models/late/generate", {"n": 2, "seed": 5}).json().get("images") != want:
        assert time.time() < deadline, "the replica kept serving the model it had cached"
        time.sleep(0.5)


def test_bad_inputs_get_clear_4xx_and_the_app_keeps_serving(server, digit):
    big = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(big, format="PNG")
    rgb = b64png(np.stack([np.zeros((28, 28), np.uint8), np.full((28, 28), 200, np.uint8), np.zeros((28, 28), np.uint8)], -1))
    cases = [
        ("/v1/models/vae/reconstruct", {"image": "%%%not-base64"}, 422, "base64"),
        ("/v1/models/vae/reconstruct", {"image": base64.b64encode(b"GIF? no, text").decode()}, 422, "not a readable image"),
        ("/v1/models/vae/reconstruct", {"image": base64.b64encode(big.getvalue()).decode()}, 413, "10000x10000"),
        ("/v1/models/gan/generate", {"n": 10**9}, 422, "limit"),
        ("/v1/models/gan/interpolate", {"a": {"seed": 1}, "b": {"seed": 2}, "steps": -3}, 422, "steps"),
        ("/v1/models/vae/reconstruct", {"image": rgb}, 422, "channel"),
        ("/v1/models/nope/generate", {"n": 1}, 404, "no model 'nope'"),
        ("/v1/models/..%2F..%2Fetc/generate", {"n": 1}, 404, ""),
        ("/v1/models/a..b/generate", {"n": 1}, 400, "invalid model name"),
        ("/v1/models/gan/generate", {"n": 1, "bogus": True}, 422, "bogus"),
    ]
    for path, body, status, message in cases:
        r = post(server, path, body)
        assert r.status_code == status, (path, body if len(str(body)) < 200 else "...", r.status_code, r.text[:300])
        if message:
            assert message in r.json()["error"], (path, r.text[:300])
    nan = requests.post(f"{server}/v1/models/gan/edit", data='{"source": {"seed": 1, "label": 0}, "direction": "sefa:0", "alpha": NaN}',
                        headers={"content-type": "application/json"}, timeout=60)
    assert nan.status_code == 422
    huge = requests.post(f"{server}/v1/models/vae/reconstruct", data=b"{" + b" " * (5 * 1024 * 1024) + b"}",
                         headers={"content-type": "application/json"}, timeout=60)
    assert huge.status_code == 413 and "limit" in huge.json()["error"]
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200
    assert len(post(server, "/v1/models/gan/generate", {"n": 2, "seed": 1}).json()["images"]) == 2
    # a bad request batched with good ones fails alone, with its own message
    with cf.ThreadPoolExecutor(8) as pool:
        bodies = [{"n": 2, "seed": i, "label": 99 if i == 3 else i} for i in range(8)]
        answers = list(pool.map(lambda b: post(server, "/v1/models/gan/generate", b), bodies))
    assert [a.status_code for a in answers] == [422 if i == 3 else 200 for i in range(8)], [a.text[:200] for a in answers]
    assert "label: 99 is out of range" in answers[3].json()["error"]
    assert answers[5].json()["images"] == post(server, "/v1/models/gan/generate", bodies[5]).json()["images"]


def _replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_autoscaling_up_under_load_and_down_after(server, registry, digit):
    from ray import serve

    from latentforge.serve.app import build_application

    cfg = ServeConfig.model_validate({
        "registry": registry, "replica_cpus": 0.1, "projection_steps": 150, "projection_restarts": 1,
        "editor": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 1,
                   "downscale_delay_s": 2, "look_back_period_s": 2},
        "generator": {"min_replicas": 1, "max_replicas": 1}})
    serve.run(build_application(cfg), name="scaletest", route_prefix="/scale")
    body = {"image": b64png(digit), "label": 1, "steps": 150}
    peak = 1
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(post, server, "/scale/v1/models/gan/reconstruct", body) for _ in range(48)]
        while not all(f.done() for f in futures):
            peak = max(peak, _replicas("scaletest", "Editor"))
            time.sleep(0.5)
        assert all(f.result().status_code == 200 for f in futures)
    assert peak >= 2, "the editor never scaled up under 16 concurrent requests"
    deadline = time.time() + 60
    while time.time() < deadline and _replicas("scaletest", "Editor") > 1:
        time.sleep(1)
    assert _replicas("scaletest", "Editor") == 1, "the editor did not scale back down after the load"
    serve.delete("scaletest")


def test_killed_replica_is_replaced_and_requests_keep_succeeding(server):
    from ray.util.state import list_actors

    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                if "Generator" in (a.class_name or "") and "latentforge" in (a.class_name or "")]
    assert replicas, "no generator replica found"
    pid = replicas[0].pid
    ok, failed = [], []
    with cf.ThreadPoolExecutor(4) as pool:
        start = time.time()
        killed = False
        while time.time() - start < 90:
            batch = [pool.submit(post, server, "/v1/models/gan/generate", {"n": 2, "seed": i}) for i in range(4)]
            for f in batch:
                try:
                    (ok if f.result().status_code == 200 else failed).append(time.time())
                except requests.RequestException:
                    failed.append(time.time())
            if not killed and len(ok) >= 8:
                os.kill(pid, signal.SIGKILL)
                killed_at, killed = time.time(), True
            if killed and ok and ok[-1] > killed_at and len([t for t in ok if t > killed_at]) >= 12:
                break
    assert killed
    after = [t for t in ok if t > killed_at]
    assert len(after) >= 12, f"only {len(after)} successful requests after the kill ({len(failed)} failed)"
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200


def _img_array(src: str) -> np.ndarray:
    return decode(src.split(",", 1)[1]).astype(np.int16)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make browser-deps)")
def test_playground_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("LATENTFORGE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length >= 2", timeout=60000)
        # the page opens with a grid of the first model already generated
        page.wait_for_function("document.querySelectorAll('#grid img').length === 8", timeout=60000)
        page.select_option("#model", "gan")
        page.wait_for_function("document.querySelectorAll('#sliders input').length > 0", timeout=60000)
        # the model change generates a grid of its own: let it land before asking for another
        page.wait_for_function("document.querySelector('#grid').dataset.model === 'gan' && "
                               "document.querySelector('#status').textContent === ''", timeout=60000)
        # generate a grid: wait for this request's grid, not the one already on the page
        before = int(page.get_attribute("#grid", "data-request"))
        page.click("#generate")
        page.wait_for_function(f"Number(document.querySelector('#grid').dataset.request) > {before}", timeout=60000)
        page.wait_for_function("document.querySelectorAll('#grid img').length === 8", timeout=60000)
        grid = [_img_array(page.get_attribute(f"#grid img:nth-child({i})", "src")) for i in (1, 2)]
        assert np.abs(grid[0] - grid[1]).mean() > 1  # different samples
        # select an image and move a slider: the edited image appears and differs
        page.click("#grid img:nth-child(2)")
        page.locator("#sliders input").first.fill("5")
        page.wait_for_function("document.querySelector('#edited').getAttribute('src')", timeout=60000)
        selected = _img_array(page.get_attribute("#selected", "src"))
        edited = _img_array(page.get_attribute("#edited", "src"))
        assert np.abs(selected - edited).mean() > 1, "moving a slider did not change the image"
        # paint a mask and inpaint: the result differs from the selected image
        box = page.locator("#canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.7, steps=10)
        page.mouse.up()
        page.click("#inpaint")
        page.wait_for_function("document.querySelector('#inpainted').getAttribute('src')", timeout=120000)
        inpainted = _img_array(page.get_attribute("#inpainted", "src"))
        painted = np.array(page.evaluate("Array.from(mask.pixels)"), bool).reshape(inpainted.shape[:2])
        assert 0 < painted.mean() < 0.9
        assert np.array_equal(inpainted[~painted], selected[~painted]), "inpainting changed the observed pixels"
        assert np.abs(inpainted[painted] - selected[painted]).max() > 0, "the painted region was not recomputed"
        # interpolation strip between two shift-clicked images
        page.click("#grid img:nth-child(1)", modifiers=["Shift"])
        page.click("#grid img:nth-child(3)", modifiers=["Shift"])
        page.click("#interpolate")
        page.wait_for_function("document.querySelectorAll('#strip img').length === 8", timeout=60000)
        assert "latent" in page.inner_text("#provenance")
        page.screenshot(path=str(artifacts / "playground-desktop.png"), full_page=True)
        # upload a colour photo of another size: the page sends its centre as the model's 28x28 grey
        photo = tmp_path / "photo.png"
        yy, xx = np.mgrid[0:200, 0:300]
        picture = Image.fromarray(np.stack([yy * 255 // 200, xx * 255 // 300, np.full_like(xx, 90)], -1).astype(np.uint8))
        picture.save(photo)
        before = int(page.get_attribute("#grid", "data-request"))
        page.set_input_files("#upload", str(photo))
        page.wait_for_function(f"Number(document.querySelector('#grid').dataset.request) > {before}", timeout=120000)
        page.wait_for_function("document.querySelectorAll('#grid img').length === 2", timeout=60000)
        sent = _img_array(page.get_attribute("#grid img:nth-child(1)", "src"))
        assert sent.ndim == 2 or (sent[..., 0] == sent[..., 1]).all()
        sent = sent if sent.ndim == 2 else sent[..., 0]
        # what `data prepare --size 28 --channels 1` makes of it (the browser resamples a little differently),
        # and clearly not the whole photo squeezed into the square
        from latentforge.data.sources import resize_square

        prepared = np.asarray(resize_square(picture, 28).convert("L"), np.int16)
        squeezed = np.asarray(picture.resize((28, 28), Image.Resampling.LANCZOS).convert("L"), np.int16)
        assert np.abs(sent - prepared).mean() < 3 < np.abs(sent - squeezed).mean(), (
            np.abs(sent - prepared).mean(), np.abs(sent - squeezed).mean())
        assert "fitted_from" in page.inner_text("#provenance") and "300x200" in page.inner_text("#provenance")
        # API errors show on the page
        page.fill("#seed", "-5")
        page.click("#generate")
        page.wait_for_selector("#error", state="visible", timeout=30000)
        assert "generate failed" in page.inner_text("#error") and "seed" in page.inner_text("#error")
        # phone-sized window: everything fits without horizontal scrolling
        phone = browser.new_page(viewport={"width": 375, "height": 740})
        phone.goto(server + "/")
        phone.wait_for_function("document.querySelectorAll('#model option').length >= 2", timeout=60000)
        phone.click("#generate")
        phone.wait_for_function("document.querySelectorAll('#grid img').length === 8", timeout=60000)
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        phone.screenshot(path=str(artifacts / "playground-phone.png"), full_page=True)
        browser.close()
    assert (artifacts / "playground-desktop.png").stat().st_size > 10_000
