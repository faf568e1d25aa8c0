"""The serving engine without Ray: determinism, batching independence, agreement with the
editing engine, and every kind of bad input refused with a clear error."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import serve_registry
from latentforge.editing.inversion import encode_vae
from latentforge.editing.space import latent_space
from latentforge.editing.restoration import inpaint
from latentforge.registry import local_checkpoint
from latentforge.serve.codec import BadInput, encode_png_b64
from latentforge.serve.engine import ModelRuntime
from latentforge.serve.schemas import EditRequest, GenerateRequest, ImageRequest, InpaintRequest, InterpolateRequest



def b64png(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def registry(mnist_dir, tmp_path_factory):
    return serve_registry(tmp_path_factory.mktemp("serve"), mnist_dir)


@pytest.fixture(scope="module")
def gan(registry):
    return ModelRuntime("gan", local_checkpoint(registry, "gan"), projection_steps=20, restarts=1)


@pytest.fixture(scope="module")
def vae(registry):
    return ModelRuntime("vae", local_checkpoint(registry, "vae"))


@pytest.fixture(scope="module")
def digit(mnist_dir):
    from latentforge.data import PreparedDataset

    return PreparedDataset(mnist_dir).load("val").images[0, 0].numpy()  # (28, 28) uint8


def test_generation_is_deterministic_and_independent_of_batching(gan):
    a = GenerateRequest(n=3, seed=7, label=4)
    b = GenerateRequest(n=2, seed=9)
    alone_a, alone_b = gan.generate_many([a])[0], gan.generate_many([b])[0]
    together = gan.generate_many([a, b])
    assert together[0]["images"] == alone_a["images"] and together[1]["images"] == alone_b["images"]
    assert gan.generate_many([a])[0]["images"] == alone_a["images"]
    assert alone_a["labels"] == [4, 4, 4] and alone_b["labels"] == [0, 1]
    assert len(alone_a["latents"]) == 3 and len(alone_a["latents"][0]) == gan.z_dim
    other = gan.generate_many([GenerateRequest(n=3, seed=8, label=4)])[0]
    assert other["images"] != alone_a["images"]


def test_reconstruct_and_inpaint_match_the_editing_engine(vae, digit):
    x = torch.from_numpy(digit).float()[None, None] / 127.5 - 1
    served = vae.reconstruct(ImageRequest(image=b64png(digit)))
    direct = encode_vae(vae.model, x)
    assert np.array_equal(decode(served["images"][0]), ((direct.reconstruction[0, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy())
    mask = np.zeros((28, 28), np.uint8)
    mask[8:20, 8:20] = 255  # white = fill
    served = vae.inpaint(InpaintRequest(image=b64png(digit), mask=b64png(mask), method="chain"))
    keep = torch.from_numpy(mask < 128).float()[None, None]
    filled, _ = inpaint(vae.model, "vae", x, keep, method="chain")
    out = decode(served["images"][0])
    assert np.array_equal(out, ((filled[0, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy())
    assert np.array_equal(out[mask < 128], digit[mask < 128])  # observed pixels untouched
    assert served["filled_fraction"] == pytest.approx(144 / 784)
    # a browser canvas sends RGBA: the same mask in any mode means the same thing
    rgba = np.stack([mask, mask, mask, np.full_like(mask, 255)], -1)
    assert vae.inpaint(InpaintRequest(image=b64png(digit), mask=b64png(rgba), method="chain"))["images"] == served["images"]


def test_a_vae_serves_its_fitted_prior_as_generate_does(vae):
    """A seed means the same latents and pixels over HTTP as from `latentforge generate`, and for a
    VAE those come from the prior fitted in training, not N(0, I); interpolation endpoints too."""
    from latentforge.sampling import generate

    assert vae.prior is not None and vae.prior is vae.ckpt.latent_prior
    served = vae.generate_many([GenerateRequest(n=3, seed=11)])[0]
    images, z, _ = generate(vae.ckpt, 3, seed=11)
    assert torch.equal(torch.tensor(served["latents"]), z)
    assert served["images"] == [encode_png_b64(im) for im in images]
    _, z_standard, _ = generate(vae.ckpt, 3, seed=11, standard_prior=True)
    assert not torch.allclose(z, z_standard)
    path = vae.interpolate(InterpolateRequest(a={"seed": 11}, b={"seed": 12}, steps=3))["latents"]
    assert torch.equal(torch.tensor(path[0]), z[0])


def test_interpolate_and_edit(gan):
    r = gan.interpolate(InterpolateRequest(a={"seed": 1, "label": 3}, b={"seed": 2, "label": 8}, steps=5))
    assert len(r["images"]) == 5 and len(r["latents"]) == 5
    assert r["a"] == {"seed": 1, "label": 3} and r["b"] == {"seed": 2, "label": 8}  # enough to send back
    direction = sorted(gan.directions)[0]
    e = gan.edit(EditRequest(source={"seed": 3, "label": 1}, direction=direction, alpha=3.0))
    assert e["images"][0] != e["original"] and e["source"] == {"seed": 3, "label": 1}
    z0 = torch.tensor(gan.generate_many([GenerateRequest(n=1, seed=3, label=1)])[0]["latents"][0])
    assert torch.tensor(e["latents"][0]).sub(z0).norm().item() == pytest.approx(3.0, rel=1e-4)


def test_default_interpolation_is_the_one_edit_eval_measures(gan, vae):
    """slerp for a GAN's Gaussian z; lerp for a VAE (posterior means lie inside the prior's shell),
    as latentforge edit-eval scores them: the API used to default every z space to slerp."""
    from latentforge.editing.space import default_interpolation

    for runtime, expected in ((gan, "slerp"), (vae, "lerp")):
        r = runtime.interpolate(InterpolateRequest(a={"seed": 1}, b={"seed": 2}, steps=3))
        assert r["method"] == expected == default_interpolation(runtime.model, runtime.algorithm)
    path = torch.tensor(vae.interpolate(InterpolateRequest(a={"seed": 1}, b={"seed": 2}, steps=3))["latents"])
    torch.testing.assert_close(path[1], (path[0] + path[2]) / 2)
    asked = vae.interpolate(InterpolateRequest(a={"seed": 1}, b={"seed": 2}, steps=3, method="slerp"))
    assert asked["method"] == "slerp" and asked["latents"][1] != path[1].tolist()


def test_bad_inputs_are_refused_with_clear_messages(gan, vae, digit):
    cases = [
        (lambda: gan.generate_many([GenerateRequest(n=100)]), "n: 100 is above the limit"),
        (lambda: vae.generate_many([GenerateRequest(n=1, label=3)]), "not class-conditional"),
        (lambda: gan.generate_many([GenerateRequest(n=1, label=12)]), "out of range"),
        (lambda: vae.reconstruct(ImageRequest(image="not base64!!")), "not valid base64"),
        (lambda: vae.reconstruct(ImageRequest(image=base64.b64encode(b"hello").decode())), "not a readable image"),
        (lambda: vae.reconstruct(ImageRequest(image=b64png(np.stack([digit, digit, 255 - digit], -1)))),
         "3 channel.* this model takes 1: convert it to greyscale"),
        (lambda: vae.reconstruct(ImageRequest(image=b64png(np.zeros((32, 32), np.uint8)))), "takes 28x28"),
        (lambda: gan.edit(EditRequest(source={"seed": 1, "label": 0}, direction="smile", alpha=1)),
         "^direction: unknown direction 'smile'"),
        (lambda: gan.edit(EditRequest(source={"seed": 1, "label": 0}, direction="sefa:0", alpha=1, orthogonal_to=["smile"])),
         "^orthogonal_to: unknown direction 'smile'"),
        # an image inverted under a class it is not would come back as another picture: its label is needed
        (lambda: gan.edit(EditRequest(source={"image": b64png(digit)}, direction="sefa:0", alpha=1)),
         "label: this model is class-conditional"),
        (lambda: gan.interpolate(InterpolateRequest(a={"image": b64png(digit), "label": 1}, b={"seed": 2}, projection_steps=9999)),
         "^projection_steps: 9999 is above the limit"),
        (lambda: gan.edit(EditRequest(source={"seed": 1, "label": 0}, direction="sefa:0", alpha=50)), "outside"),
        (lambda: gan.edit(EditRequest(source={"latent": [0.1] * 5, "label": 0}, direction="sefa:0", alpha=1)), "has 5 values"),
        (lambda: gan.inpaint(InpaintRequest(image=b64png(digit), mask=b64png(np.zeros((28, 28), np.uint8)))), "no pixel is marked"),
        (lambda: gan.inpaint(InpaintRequest(image=b64png(digit), mask=b64png(np.full((28, 28), 255, np.uint8)), method="chain", label=0)), "needs a VAE"),
    ]
    for call, message in cases:
        with pytest.raises(BadInput, match=message):
            call()


def test_base64_as_clients_send_it_and_masks_with_transparency(vae, digit):
    """`base64 FILE` wraps lines, a canvas gives a data: URL, some encoders are URL-safe and unpadded:
    each is the same image. A mask's transparent pixels are kept, whatever colour they store (an
    editor exports a layer's untouched area as transparent white)."""
    plain = b64png(digit)
    raw = base64.b64decode(plain)
    forms = {"wrapped": base64.encodebytes(raw).decode(), "data URL": "data:image/png;base64," + plain,
             "URL-safe, unpadded": base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    want = vae.reconstruct(ImageRequest(image=plain))["images"]
    for name, sent in forms.items():
        assert vae.reconstruct(ImageRequest(image=sent))["images"] == want, name
    mask = np.zeros((28, 28, 4), np.uint8)
    mask[..., :3] = 255  # white everywhere, transparent outside the square
    mask[10:18, 10:18, 3] = 255
    r = vae.inpaint(InpaintRequest(image=plain, mask=b64png(mask), method="chain"))
    assert r["filled_fraction"] == pytest.approx(64 / 784)
    out = decode(r["images"][0])
    keep = np.ones((28, 28), bool)
    keep[10:18, 10:18] = False
    assert np.array_equal(out[keep], digit[keep])


def test_a_colour_png_with_equal_channels_is_read_as_the_grey_image_it_is(digit):
    """A browser canvas encodes every PNG as RGBA: a grey picture drawn there reaches a 1-channel
    model exactly as the greyscale PNG would (the playground's uploads take that path)."""
    from latentforge.serve.codec import decode_image_b64

    grey = decode_image_b64(b64png(digit), "image", (1, 28, 28), 64)
    rgba = np.stack([digit, digit, digit, np.full_like(digit, 255)], -1)
    for same in (np.stack([digit] * 3, -1), rgba):
        assert torch.equal(decode_image_b64(b64png(same), "image", (1, 28, 28), 64), grey)
    see_through = rgba.copy()
    see_through[:14, :, 3] = 0  # transparent pixels are black whatever colour lies under them
    expected = grey.clone()
    expected[..., :14, :] = -1.0
    assert torch.equal(decode_image_b64(b64png(see_through), "image", (1, 28, 28), 64), expected)
    tinted = np.stack([digit, digit, np.clip(digit.astype(int) + 1, 0, 255).astype(np.uint8)], -1)
    with pytest.raises(BadInput, match="3 channel"):  # one level off in one channel is colour
        decode_image_b64(b64png(tinted), "image", (1, 28, 28), 64)


def test_fit_takes_a_photo_of_any_size_as_data_prepare_would(vae, digit):
    """"fit": true takes any size and mode up to max_image_side: the centre square resized to the
    model's side (`data prepare --size`'s `resize_square`), its luma for a grey model, transparent
    pixels black; the mask of an inpainting is fitted the same way. Without it the size is refused,
    naming the option."""
    from latentforge.data.sources import resize_square
    from latentforge.images import to_model_range
    from latentforge.serve.codec import decode_image_b64, decode_mask_b64

    yy, xx = np.mgrid[0:200, 0:300]
    photo = np.stack([yy * 255 // 200, xx * 255 // 300, np.full_like(xx, 90)], -1).astype(np.uint8)
    with pytest.raises(BadInput, match='image is 300x200; this model takes 28x28 images: resize it, or send "fit": true'):
        decode_image_b64(b64png(photo), "image", (1, 28, 28), 1024)
    fitted = decode_image_b64(b64png(photo), "image", (1, 28, 28), 1024, fit=True)
    expected = np.asarray(resize_square(Image.fromarray(photo).convert("L"), 28))  # data prepare's order
    assert torch.equal(fitted, to_model_range(torch.from_numpy(expected.copy())[None, None]))
    colour = decode_image_b64(b64png(np.full((40, 50), 77, np.uint8)), "image", (3, 32, 32), 1024, fit=True)
    assert colour.shape == (1, 3, 32, 32) and torch.equal(colour[0, 0], colour[0, 2])  # grey to a colour model
    see_through = np.zeros((56, 56, 4), np.uint8)
    see_through[..., :3] = 255  # white under alpha 0 is black
    assert (decode_image_b64(b64png(see_through), "image", (1, 28, 28), 1024, fit=True) == -1).all()
    hole = np.zeros((56, 56), np.uint8)
    hole[14:42, 14:42] = 255  # fill the centre
    keep = decode_mask_b64(b64png(hole), (1, 28, 28), 1024, fit=True)
    assert keep.shape == (1, 1, 28, 28) and keep[0, 0, 8:20, 8:20].sum() == 0 and keep[0, 0, :6].all()
    stroke = np.zeros((1024, 1024), np.uint8)
    stroke[:, 510:514] = 255  # a 4-px line painted on a large photo's mask stays painted at 28 px
    thin = decode_mask_b64(b64png(stroke), (1, 28, 28), 1024, fit=True)
    assert 0 < (thin == 0).sum() <= 2 * 28
    dot = np.zeros((1024, 1024), np.uint8)
    dot[500, 500] = 255  # even one painted pixel
    assert (decode_mask_b64(b64png(dot), (1, 28, 28), 1024, fit=True) == 0).sum() == 1
    gan_digit = b64png(np.kron(digit, np.ones((2, 2), np.uint8)))
    with pytest.raises(BadInput, match="mask: is 1024x1024 and the image 56x56; with fit, send the mask at the image's size"):
        vae.inpaint(InpaintRequest(image=gan_digit, mask=b64png(stroke), method="chain", fit=True))
    with pytest.raises(BadInput, match="largest accepted side is 64"):  # the header limit holds with fit too
        decode_image_b64(b64png(photo), "image", (1, 28, 28), 64, fit=True)
    big = np.kron(digit, np.ones((3, 3), np.uint8))  # the digit at 84 px
    r = vae.reconstruct(ImageRequest(image=b64png(big), fit=True))
    native = vae.reconstruct(ImageRequest(image=b64png(digit)))
    assert decode(r["images"][0]).shape[:2] == (28, 28) and abs(r["mse"] - native["mse"]) < 0.05 * native["mse"]
    path = vae.interpolate(InterpolateRequest(a={"image": b64png(big), "fit": True}, b={"seed": 1}, steps=3))
    assert path["a"]["inverted"] and len(path["images"]) == 3  # a latent source's image is fitted too


def test_an_upload_is_read_as_a_viewer_shows_it(digit):
    """A phone photo's EXIF rotation is applied, and a 16-bit grey PNG is scaled to 8 bits (PIL's
    convert("L") clips it to white), for the API as for data preparation."""
    from latentforge.data.sources import decode_image
    from latentforge.serve.codec import decode_image_b64

    grey = decode_image_b64(b64png(digit), "image", (1, 28, 28), 64)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored as the sensor saw it: shown rotated 90 degrees clockwise
    Image.fromarray(np.rot90(digit, 1).copy()).save(buf, format="PNG", exif=exif)
    rotated = base64.b64encode(buf.getvalue()).decode()
    assert torch.equal(decode_image_b64(rotated, "image", (1, 28, 28), 64), grey)
    assert np.array_equal(np.asarray(decode_image(buf.getvalue(), "rotated.png")), digit)
    # a quarter turn on a non-square model: checked as displayed, never reshaped into scrambled pixels
    wide = np.zeros((28, 32), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG", exif=exif)  # shown 28 wide, 32 high
    with pytest.raises(BadInput, match="image is 28x32; this model takes 32x28"):
        decode_image_b64(base64.b64encode(buf.getvalue()).decode(), "image", (1, 28, 32), 64)
    assert decode_image_b64(base64.b64encode(buf.getvalue()).decode(), "image", (1, 32, 28), 64).shape == (1, 1, 32, 28)
    # a damaged EXIF block leaves the image readable, unrotated
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, format="PNG", exif=b"Exif\x00\x00II*\x00")
    assert torch.equal(decode_image_b64(base64.b64encode(buf.getvalue()).decode(), "image", (1, 28, 28), 64), grey)
    assert np.array_equal(np.asarray(decode_image(buf.getvalue(), "damaged.png")), digit)
    buf = io.BytesIO()
    Image.fromarray(digit.astype(np.uint16) * 257).save(buf, format="PNG")  # 16-bit grey: 0..65535
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    assert torch.equal(decode_image_b64(base64.b64encode(buf.getvalue()).decode(), "image", (1, 28, 28), 64), grey)
    assert np.array_equal(np.asarray(decode_image(buf.getvalue(), "deep.png")), digit)


def test_huge_png_is_refused_from_its_header(vae):
    buf = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buf, format="PNG")  # ~100 KB compressed, 100 MB decoded
    with pytest.raises(BadInput) as e:
        vae.reconstruct(ImageRequest(image=base64.b64encode(buf.getvalue()).decode()))
    assert e.value.status == 413 and "10000x10000" in str(e.value)


def test_nan_never_reaches_a_model():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        EditRequest.model_validate({"source": {"seed": 1}, "direction": "sefa:0", "alpha": float("nan")})
    with pytest.raises(ValidationError):
        InterpolateRequest.model_validate({"a": {"latent": [float("inf")] * 4}, "b": {"seed": 1}})
    with pytest.raises(ValidationError, match="exactly one of seed, image, latent"):
        InterpolateRequest.model_validate({"a": {"seed": 1, "latent": [0.0]}, "b": {"seed": 1}})


def test_a_resnet_model_generates_and_edits_through_the_interface(registry):
    rn = ModelRuntime("resnet", local_checkpoint(registry, "resnet"))
    a = rn.generate_many([GenerateRequest(n=2, seed=5)])[0]
    assert a == rn.generate_many([GenerateRequest(n=2, seed=5)])[0] and decode(a["images"][0]).shape == (28, 28)
    assert {"sefa:0", "pca:0"} <= set(rn.directions)  # from first_layer_weight / first_layer, not model attributes
    e = rn.edit(EditRequest(source={"seed": 3}, direction="sefa:1", alpha=2.0))
    z0 = torch.tensor(rn.generate_many([GenerateRequest(n=1, seed=3)])[0]["latents"][0])
    assert torch.tensor(e["latents"][0]).sub(z0).norm().item() == pytest.approx(2.0, rel=1e-4)
    assert e["images"][0] != e["original"] and e["source"] == {"seed": 3}  # unconditional: no label


def test_a_stylegan_model_is_served_in_w(registry):
    sg = ModelRuntime("stylegan", local_checkpoint(registry, "stylegan"), projection_steps=10, restarts=1)
    assert latent_space(sg.model) == "w" and sg.z_dim == 128  # the API's latents are ws
    a = sg.generate_many([GenerateRequest(n=2, seed=5, truncation=0.5, include_latents=True)])[0]
    assert a == sg.generate_many([GenerateRequest(n=2, seed=5, truncation=0.5, include_latents=True)])[0]
    w = torch.tensor(a["latents"])
    w_full = torch.tensor(sg.generate_many([GenerateRequest(n=2, seed=5, include_latents=True)])[0]["latents"])
    w_avg = sg.model.prior_center
    torch.testing.assert_close(w, w_avg + 0.5 * (w_full - w_avg))  # truncation is ψ in W
    assert {"sefa:0", "pca:0"} <= set(sg.directions) and sg.directions["sefa:0"].vector.shape == (128,)
    e = sg.edit(EditRequest(source={"seed": 3}, direction="sefa:1", alpha=2.0))
    assert torch.tensor(e["latents"][0]).sub(w_full.new_tensor(
        sg.generate_many([GenerateRequest(n=1, seed=3, include_latents=True)])[0]["latents"][0])).norm().item() == \
        pytest.approx(2.0, rel=1e-4)
    i = sg.interpolate(InterpolateRequest(a={"seed": 1}, b={"seed": 2}, steps=3))
    assert i["method"] == "lerp"  # W is not Gaussian: straight lines by default
    path = torch.tensor(i["latents"])
    torch.testing.assert_close(path[1], (path[0] + path[2]) / 2)
    r = sg.edit(EditRequest(source={"latent": path[1].tolist()}, direction="pca:0", alpha=-1.0))
    assert r["images"][0] != r["original"]


def test_a_bad_request_in_a_batch_gets_its_error_and_the_rest_one_forward_pass(gan, monkeypatch):
    """A label the model lacks (or n over the limit) is found before the forward pass: the batch's
    other requests still share one pass and get exactly what they get alone. Before, the batch
    raised and the Generator re-ran every request of it one by one."""
    import latentforge.serve.engine as engine

    good = [GenerateRequest(n=2, seed=5, label=1), GenerateRequest(n=1, seed=6)]
    alone = [gan.generate_many([r])[0] for r in good]
    passes = []
    real = engine.decode_latents
    monkeypatch.setattr(engine, "decode_latents", lambda *a, **k: passes.append(1) or real(*a, **k))
    out = gan.generate_each([good[0], GenerateRequest(n=1, label=12), GenerateRequest(n=100), good[1]])
    assert len(passes) == 1
    assert isinstance(out[1], BadInput) and "out of range" in str(out[1])
    assert isinstance(out[2], BadInput) and "above the limit" in str(out[2])
    assert out[0]["images"] == alone[0]["images"] and out[3]["images"] == alone[1]["images"]
    assert all(isinstance(r, BadInput) for r in gan.generate_each([GenerateRequest(n=1, label=10)]))
    assert len(passes) == 1  # nothing left to run: no pass
