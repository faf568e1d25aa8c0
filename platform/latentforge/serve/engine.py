"""The serving engine: one loaded registry model and every operation the endpoints expose.
Pure PyTorch (no Ray): the Serve deployments call it, and tests compare it with the editing
engine directly."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
from pathlib import Path

import torch

from latentforge.algorithms.precision import inference_precision
from latentforge.checkpoint import load_checkpoint
from latentforge.devices import on_device
from latentforge.editing.directions import apply_edit, data_free_directions, first_layer_editable, load_directions
from latentforge.editing.inversion import Inversion, ProjectionStopped, invert
from latentforge.editing.latent import interpolation_path
from latentforge.editing.restoration import denoise, inpaint
from latentforge.editing.space import default_interpolation, edit_model
from latentforge.sampling import decode_latents, seeded_latents
from latentforge.serve.codec import (
    RETRY_AFTER_S,
    BadInput,
    decode_image_b64,
    decode_mask_b64,
    encode_png_b64,
    image_size_b64,
)
from latentforge.serve.schemas import (
    EditRequest,
    GenerateRequest,
    ImageRequest,
    InpaintRequest,
    InterpolateRequest,
    LatentSource,
    ServeLimits,
)

MAX_LATENT_ABS = 50.0  # |z| entries beyond this are not latents a Gaussian prior ever produces

logger = logging.getLogger("latentforge.serve")


class ModelRuntime:
    """A registry model loaded for serving.

    Args:
        name: registry name.
        checkpoint_dir: the entry's checkpoint folder (config.json + model.safetensors).
        limits: request limits.
        projection_steps: default Adam steps for GAN inversion/inpainting/denoising.
        restarts: random starts per GAN projection.
        device: where the model runs ('cpu', or 'cuda' in a GPU replica). Latents, labels,
            images and directions stay on the CPU; `decode_latents` and `latents_from_noise`
            move them to the model and back, and so do the projections (`editing.inversion`).
    """

    def __init__(self, name: str, checkpoint_dir: str | Path, limits: ServeLimits | None = None,
                 projection_steps: int = 200, restarts: int = 2, device: str = "cpu"):
        self.name = name
        self.limits = limits or ServeLimits()
        self.ckpt = load_checkpoint(checkpoint_dir, device=device)
        self.model = edit_model(self.ckpt.inference_generator())  # latents are w for generators with W
        self.prior = self.ckpt.latent_prior  # a VAE's fitted prior: seeds sample from it, as `latentforge generate` does
        self.algorithm = self.ckpt.algorithm
        # generation runs as the model trained (fp32 where bf16 is only emulated); projections stay fp32
        self.precision = inference_precision(self.ckpt.precision, torch.device(device).type)
        self.shape = tuple(self.ckpt.data.image_shape)
        self.z_dim, self.num_classes = self.model.z_dim, self.model.num_classes
        self.projection_steps, self.restarts = projection_steps, restarts
        # Edit directions are read (or computed) only by what edits: generation never waits for them.
        self._checkpoint_dir = Path(checkpoint_dir)
        self._directions: dict | None = None
        self._directions_lock = threading.Lock()
        self._computing: threading.Thread | None = None
        self._directions_error: str | None = None
        self._local = threading.local()  # per request thread: what tells a projection to stop

    # ------------------------------------------------------------------------------ directions
    def prepare_directions(self, background: bool = False) -> None:
        """Read the saved directions; where there are none (an entry promoted before promotion
        computed them) compute the data-free ones (SeFa, GANSpace), in a background thread when
        `background`: a replica answers "computing" meanwhile instead of holding a request."""
        with self._directions_lock:
            if self._directions is not None or self._computing is not None:
                return
            stored = load_directions(self._checkpoint_dir)
            if stored or not first_layer_editable(self.model):
                self._directions = stored
                return
            if not background:
                self._directions = self._data_free()
                return
            self._computing = threading.Thread(target=self._compute_directions, daemon=True,
                                               name=f"directions-{self.name}")
            self._computing.start()

    def _compute_directions(self) -> None:
        try:
            found = self._data_free()
        except Exception as e:  # noqa: BLE001 - reported by directions_info / edit, never a crash
            logger.exception("computing the directions of %s failed", self.name)
            found, self._directions_error = {}, f"computing them failed ({type(e).__name__})"
        with self._directions_lock:
            self._directions, self._computing = found, None

    def _data_free(self) -> dict:
        """SeFa / GANSpace directions by name, computed from a CPU copy of the model wherever this
        runtime runs it: GANSpace feeds the model CPU latents, and a GPU's eigenvectors could come
        out with other signs than the CPU Editor's, so one edit would move a seed and an image
        opposite ways. The copy is of the weights in memory (the checkpoint folder may have been
        replaced or evicted from the download cache since it was loaded)."""
        model = self.model if on_device(self.model, "cpu") else copy.deepcopy(self.model).cpu()
        return {d.name: d for d in data_free_directions(model, self.algorithm)}

    @property
    def directions_ready(self) -> bool:
        return self._directions is not None

    @property
    def directions(self) -> dict:
        """The model's edit directions by name; BadInput 503 while they are being computed."""
        if self._directions is None and self._computing is None:
            self.prepare_directions()
        found = self._directions
        if found is None:
            raise BadInput(f"the edit directions of model {self.name!r} are being computed (this model was promoted "
                           f"without them; `latentforge registry promote` now stores them); retry in "
                           f"{RETRY_AFTER_S} s", status=503)
        return found

    # ------------------------------------------------------------------------------ helpers
    def _labels(self, n: int, label: int | None, cycle: bool = False, field: str = "label") -> torch.Tensor | None:
        if not self.num_classes:
            if label is not None:
                raise BadInput(f"{field}: this model is not class-conditional; leave label out")
            return None
        if label is None:
            if cycle:
                return torch.arange(n) % self.num_classes
            raise BadInput(f"{field}: this model is class-conditional; give a label in 0..{self.num_classes - 1}")
        if label >= self.num_classes:
            raise BadInput(f"{field}: {label} is out of range; this model has classes 0..{self.num_classes - 1}")
        return torch.full((n,), label, dtype=torch.long)

    def _steps(self, steps: int | None, field: str = "steps") -> int:
        steps = steps or self.projection_steps
        if steps > self.limits.max_projection_steps:
            raise BadInput(f"{field}: {steps} is above the limit of {self.limits.max_projection_steps}")
        return steps

    def _projection(self, steps: int | None, images: int = 1, field: str = "steps") -> dict:
        """Keyword arguments of a GAN projection (Adam steps, random starts, the stop check), once
        the request's whole projection work (steps × starts × images) is within the budget: a
        request of a kilobyte must not buy minutes of a replica. `field` names the request's field
        that set the steps."""
        steps = self._steps(steps, field)
        work = steps * self.restarts * images
        if work > self.limits.max_projection_work:
            raise BadInput(f"this request needs {steps} steps × {self.restarts} starts × {images} image(s) = {work} "
                           f"projection steps; the limit per request is {self.limits.max_projection_work}: ask for "
                           "fewer steps (or send latents or seeds instead of images)")
        return {"steps": steps, "restarts": self.restarts, "should_stop": getattr(self._local, "should_stop", None)}

    @contextlib.contextmanager
    def stoppable(self, should_stop, deadline_s: float):
        """Projections run in this thread under the block stop at their next step once
        `should_stop()` is true (the server's deadline of `deadline_s` passed, or the client went
        away); the request then fails with a 504."""
        self._local.should_stop = should_stop
        try:
            yield
        except ProjectionStopped as e:
            raise BadInput(f"the request ran past the server's deadline of {deadline_s:g} s and was stopped; ask for "
                           "fewer projection steps", status=504) from e
        finally:
            self._local.should_stop = None

    def _image(self, data: str, fit: bool = False, field: str = "image") -> torch.Tensor:
        return decode_image_b64(data, field, self.shape, self.limits.max_image_side, fit)

    def _invert(self, x: torch.Tensor, labels, steps: int | None, field: str = "steps") -> Inversion:
        return invert(self.model, self.algorithm, x, labels,
                      **({} if self.algorithm == "vae" else self._projection(steps, field=field)))

    def _latent(self, src: LatentSource, steps: int | None, field: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(z (D,), labels (1,) or None, provenance) for a LatentSource. A conditional model's
        provenance names the label used, so sending it back reproduces the image. A seed or latent
        without a label takes class 0 (as generate's first image); an image needs its label, as in
        reconstruct: inverted under another class, it would come back as another picture."""
        labels = self._labels(1, src.label, cycle=src.image is None, field=f"{field}.label")
        z, prov = self._source_latent(src, labels, steps, field)
        return z, labels, prov if labels is None else {**prov, "label": int(labels[0])}

    def _source_latent(self, src: LatentSource, labels: torch.Tensor | None, steps: int | None, field: str):
        if src.seed is not None:
            return seeded_latents(self.model, 1, src.seed, labels=labels, prior=self.prior)[0], {"seed": src.seed}
        if src.latent is not None:
            z = torch.tensor(src.latent, dtype=torch.float32)
            if z.numel() != self.z_dim:
                raise BadInput(f"{field}.latent: has {z.numel()} values; this model's latents have {self.z_dim}")
            if not torch.isfinite(z).all() or z.abs().max() > MAX_LATENT_ABS:
                raise BadInput(f"{field}.latent: values must be finite and within ±{MAX_LATENT_ABS}")
            return z, {"latent": "given"}
        inv = self._invert(self._image(src.image, src.fit, field=f"{field}.image"), labels, steps, field="projection_steps")
        return inv.latent[0], {"inverted": True, "reconstruction_mse": float(inv.error[0])}

    def _images(self, images: torch.Tensor) -> list[str]:
        return [encode_png_b64(im) for im in images]

    # ------------------------------------------------------------------------------ operations
    def generate_each(self, requests: list[GenerateRequest]) -> list:
        """A result or a `BadInput` per request (the batching path). The bad ones (n over the limit,
        a label the model lacks) are found before the forward pass and the rest still share one:
        a request sent to break batching gets its own error and costs the others nothing."""
        out: list = [None] * len(requests)
        good = []
        for i, r in enumerate(requests):
            try:
                self._check_n(r.n)
                self._labels(r.n, r.label, cycle=True)
            except BadInput as e:
                out[i] = e
            else:
                good.append(i)
        if good:
            for i, result in zip(good, self.generate_many([requests[i] for i in good])):
                out[i] = result
        return out

    def _check_n(self, n: int) -> None:
        if n > self.limits.max_n:
            raise BadInput(f"n: {n} is above the limit of {self.limits.max_n} images per request")

    def generate_many(self, requests: list[GenerateRequest]) -> list[dict]:
        """Generate for several requests in one forward pass (the batching path); every request's
        latents come from its own seed, so the result does not depend on what it was batched with."""
        zs, ys, sizes = [], [], []
        for r in requests:
            self._check_n(r.n)
            ys.append(self._labels(r.n, r.label, cycle=True))
            zs.append(seeded_latents(self.model, r.n, r.seed, r.truncation, ys[-1], self.prior))
            sizes.append(r.n)
        labels = torch.cat(ys) if self.num_classes else None
        images = decode_latents(self.model, torch.cat(zs), labels, precision=self.precision)
        out, i = [], 0
        for r, z, y, n in zip(requests, zs, ys, sizes):
            res = {"model": self.name, "seed": r.seed, "n": n, "truncation": r.truncation,
                   "labels": None if y is None else y.tolist(), "images": self._images(images[i : i + n])}
            if r.include_latents:
                res["latents"] = z.tolist()
            out.append(res)
            i += n
        return out

    def reconstruct(self, r: ImageRequest) -> dict:
        x = self._image(r.image, r.fit)
        labels = self._labels(1, r.label)
        inv = self._invert(x, labels, r.steps)
        return {"model": self.name, "images": self._images(inv.reconstruction), "latents": inv.latent.tolist(),
                "mse": float(inv.error[0])}

    def interpolate(self, r: InterpolateRequest) -> dict:
        if r.steps > self.limits.max_steps:
            raise BadInput(f"steps: {r.steps} is above the limit of {self.limits.max_steps}")
        if self.algorithm != "vae":  # the budget counts both ends before either is inverted
            images = sum(s.image is not None for s in (r.a, r.b))
            if images:
                self._projection(r.projection_steps, images=images, field="projection_steps")
        za, ya, pa = self._latent(r.a, r.projection_steps, "a")
        zb, yb, pb = self._latent(r.b, r.projection_steps, "b")
        method = r.method or default_interpolation(self.model, self.algorithm)  # what edit-eval measures
        path = interpolation_path(za, zb, r.steps, method)
        labels = None
        if self.num_classes:  # the label switches halfway (labels are discrete)
            labels = torch.where(torch.arange(r.steps) < r.steps / 2, ya[0], yb[0])
        images = decode_latents(self.model, path, labels, precision=self.precision)
        return {"model": self.name, "method": method, "images": self._images(images), "latents": path.tolist(),
                "a": pa, "b": pb}

    def edit(self, r: EditRequest) -> dict:
        if abs(r.alpha) > self.limits.max_alpha:
            raise BadInput(f"alpha: {r.alpha} is outside ±{self.limits.max_alpha}")
        directions = self.directions
        for field, name in [("direction", r.direction), *(("orthogonal_to", n) for n in r.orthogonal_to)]:
            if name not in directions:
                have = (f"this model has: {', '.join(sorted(directions))}" if directions else
                        f"this model has no edit directions ({self._directions_error or 'its architecture offers none'})")
                raise BadInput(f"{field}: unknown direction {name!r}; {have}")
        z, labels, prov = self._latent(r.source, r.projection_steps, "source")
        others = [directions[n].vector for n in r.orthogonal_to]
        try:
            edited = apply_edit(z[None], directions[r.direction].vector, r.alpha, others or None)
        except ValueError as e:  # the direction lies in the span of orthogonal_to
            raise BadInput(f"orthogonal_to: {e}") from e
        images = decode_latents(self.model, torch.cat([z[None], edited]), None if labels is None else labels.repeat(2),
                                precision=self.precision)
        return {"model": self.name, "direction": r.direction, "alpha": r.alpha, "images": self._images(images[1:]),
                "original": self._images(images[:1])[0], "latents": edited.tolist(), "source": prov}

    def inpaint(self, r: InpaintRequest) -> dict:
        x = self._image(r.image, r.fit)
        if r.fit:  # fitted alone, a mask of another size would cover another part of the picture
            sizes = [image_size_b64(d, f, self.limits.max_image_side) for d, f in ((r.image, "image"), (r.mask, "mask"))]
            if sizes[0] != sizes[1]:
                raise BadInput(f"mask: is {sizes[1][0]}x{sizes[1][1]} and the image {sizes[0][0]}x{sizes[0][1]}; "
                               "with fit, send the mask at the image's size")
        keep = decode_mask_b64(r.mask, self.shape, self.limits.max_image_side, r.fit)
        labels = self._labels(1, r.label)
        if r.method == "chain" and self.algorithm != "vae":
            raise BadInput("method: 'chain' needs a VAE; use 'optimize' for GANs")
        kwargs = {} if r.method == "chain" else self._projection(r.steps)
        if r.method == "optimize" and self.algorithm == "gan":
            kwargs["average"] = self.restarts  # the fill is the mean of every start's fit
        filled, inv = inpaint(self.model, self.algorithm, x, keep, labels, method=r.method, **kwargs)
        return {"model": self.name, "method": r.method, "images": self._images(filled),
                "latents": None if inv is None else inv.latent.tolist(),  # the best single fit
                "averaged_fits": kwargs.get("average", 1), "filled_fraction": float(1 - keep.mean())}

    def denoise(self, r: ImageRequest) -> dict:
        x = self._image(r.image, r.fit)
        labels = self._labels(1, r.label)
        kwargs = {} if self.algorithm == "vae" else self._projection(r.steps)
        clean = denoise(self.model, self.algorithm, x, labels, **kwargs)
        return {"model": self.name, "images": self._images(clean)}

    def directions_info(self) -> dict:
        if self._directions is None and self._computing is not None:
            return {"model": self.name, "status": "computing", "retry_after_s": RETRY_AFTER_S, "directions": []}
        directions = self.directions
        status = "failed: " + self._directions_error if self._directions_error else "ready"
        return {"model": self.name, "status": status, "directions": [
            {"name": d.name, "method": d.method, **{k: v for k, v in d.meta.items() if isinstance(v, (int, float, str))
                                                    and not (isinstance(v, float) and not math.isfinite(v))}}
            for d in sorted(directions.values(), key=lambda d: d.name)]}
