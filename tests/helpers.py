"""Test helpers importable from any test module (conftest.py files cannot be imported by name
once there is more than one)."""

from __future__ import annotations

import textwrap

TINY_GAN = {"train.tracking": "none", "model.g_width": 8, "model.d_width": 8, "model.z_dim": 16, "train.global_batch_size": 16,
            "train.log_every": 5, "train.sample_every": 1000, "train.checkpoint_every": 1000, "train.sample_count": 16}
TINY_VAE = {"train.tracking": "none", "model.width": 8, "model.z_dim": 8, "train.global_batch_size": 16,
            "train.log_every": 5, "train.sample_every": 1000, "train.checkpoint_every": 1000, "train.sample_count": 16}


def tiny(preset: str, **overrides):
    """A preset shrunk for tests (8-channel nets, batch 16), with dotted overrides as kwargs
    (use '__' for '.', e.g. train__steps=10)."""
    from latentforge.config import load_experiment, load_experiment_dict

    base = TINY_VAE if load_experiment_dict(preset)[0].get("algorithm") == "vae" else TINY_GAN
    extra = {k.replace("__", "."): v for k, v in overrides.items()}
    return load_experiment(preset, {**base, **extra})


# The data each preset family is made for: (channels, side, classes), chosen by the name's suffix.
PRESET_INPUTS = {"-mnist": (1, 28, 10), "-shapes": (3, 32, 3), "-color": (3, 32, 3)}


def preset_input(name: str):
    """16 images of the kind preset `name` is made for, whose pixels are integer arithmetic (exact
    everywhere), labels cycling: (Split, DataSpec)."""
    import pytest
    import torch

    from latentforge.data.dataset import Split
    from latentforge.data.spec import DataSpec

    suffix = next((s for s in PRESET_INPUTS if name.endswith(s)), None)
    if suffix is None:
        pytest.fail(f"preset {name!r}: add the data it is made for to PRESET_INPUTS in tests/helpers.py")
    c, side, classes = PRESET_INPUTS[suffix]
    n = 16
    i = torch.arange(n).view(n, 1, 1, 1)
    ch = torch.arange(c).view(1, c, 1, 1)
    y = torch.arange(side).view(1, 1, side, 1)
    x = torch.arange(side).view(1, 1, 1, side)
    images = ((i * 37 + ch * 91 + y * y * 3 + x * (i + 5) * 7) % 256).to(torch.uint8)
    labels = torch.arange(n) % classes
    return Split(images, labels), DataSpec((c, side, side), classes, tuple(str(k) for k in range(classes)))


CHROMIUM = "/usr/bin/chromium"  # Debian's package; .ci/run installs it (never a browser download)


def launch_chromium(playwright):
    """Debian's chromium under Playwright, headless and quiet (no network beyond the test server)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def serve_registry(root, mnist_dir) -> str:
    """A registry under `root` with 3-step models: a conditional DCGAN ('gan'), a VAE ('vae') and a
    ResNet GAN with self-attention and DiffAugment ('resnet') and a StyleGAN2-style GAN with style
    mixing ('stylegan', edited in W)."""
    from latentforge.registry import promote
    from latentforge.train.local import train_local

    for name, preset, extra in (("gan", "cdcgan-mnist", {}), ("vae", "vae-mnist", {}),
                                ("resnet", "resnet-diffaug-mnist", {"model__g_options": {"attention_res": 14}}),
                              ("stylegan", "stylegan2-mnist", {"model__g_options": {"style_mixing": 0.9}})):
        train_local(tiny(preset, train__steps=3, train__checkpoint_every=3, **extra), mnist_dir, root / f"run-{name}",
                    log=lambda *_: None)
        promote(root / f"run-{name}", str(root / "registry"), name)
    return str(root / "registry")


SWEEP_TINY = """
name: {name}
base: dcgan-mnist
overrides: {{model.g_width: 16, model.d_width: 16, model.z_dim: 32, train.global_batch_size: 32}}
space:
{space}
trials: {trials}
steps: {steps}
eval_every: {eval_every}
eval_samples: 200
report_every: 10
max_concurrent: 2
scheduler: {scheduler}
stopper: {{warmup_steps: 200, patience: 2}}
"""


def sweep_file(tmp_path, name="tiny", space="  gan.lr_g: {grid: [2.0e-4, 1.0]}", trials=1, steps=200,
               scheduler="{kind: fifo}", eval_every=50):
    """A small DCGAN sweep YAML (16-channel nets, batch 32) written to tmp_path."""
    f = tmp_path / f"{name}.yaml"
    f.write_text(SWEEP_TINY.format(name=name, space=space, trials=trials, steps=steps, scheduler=scheduler, eval_every=eval_every))
    return f


# A user's own GAN in a module outside the package (plug-in tests write it to a temporary folder).
PLUGIN_SOURCE = textwrap.dedent('''
    """A user's own GAN, outside the package."""
    import torch
    from torch import nn


    class TinyDiscriminator(nn.Module):
        def __init__(self, *, channels, resolution, width, norm, num_classes):
            super().__init__()
            self.init_args = dict(channels=channels, resolution=resolution, width=width, norm=norm, num_classes=num_classes)
            self.num_classes = num_classes
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * resolution * resolution, width), nn.LeakyReLU(0.2),
                                     nn.Linear(width, 1))

        def forward(self, x, labels=None):
            return self.net(x).squeeze(1)


    class OpaqueGenerator(nn.Module):
        """The least a generator needs: z_dim, num_classes, init_args, forward and decode."""

        discriminator_class = TinyDiscriminator

        def __init__(self, *, z_dim, channels, resolution, width, norm, num_classes, embed_dim, scale=1.0):
            super().__init__()
            self.init_args = dict(z_dim=z_dim, channels=channels, resolution=resolution, width=width, norm=norm,
                                  num_classes=num_classes, embed_dim=embed_dim, scale=scale)
            self.z_dim, self.num_classes, self.shape = z_dim, num_classes, (channels, resolution, resolution)
            self.net = nn.Sequential(nn.Linear(z_dim, width), nn.ReLU(), nn.Linear(width, channels * resolution ** 2))
            self.scale = scale

        def forward(self, z, labels=None):
            return torch.tanh(self.scale * self.net(z)).view(-1, *self.shape)

        def decode(self, z, labels=None):
            return self(z, labels)


    class TinyGenerator(OpaqueGenerator):
        """Also exposes its first layer, so SeFa and GANSpace directions work."""

        def first_layer(self, z, labels=None):
            return self.net[0](z)

        def first_layer_weight(self):
            return self.net[0].weight
''')


# Device placement on a CPU-only machine (tests/unit/metrics/test_devices.py explains the method).
class WrongDevice(AssertionError):
    pass


CHECKED = {"inputs": 0}  # forward passes the guard has seen (a test must get as far as one)


def on_meta_with_guard(module):
    """`module` on the "meta" device, every module with parameters refusing inputs elsewhere."""
    import torch

    module = module.to("meta")

    def check(mod, args, kwargs):
        own = next(mod.parameters(recurse=False), None)
        if own is None:
            return
        CHECKED["inputs"] += 1
        for t in [*args, *kwargs.values()]:
            if isinstance(t, torch.Tensor) and t.device != own.device:
                raise WrongDevice(f"{type(mod).__name__} lives on {own.device} but got an input on {t.device}")

    for m in module.modules():
        m.register_forward_pre_hook(check, with_kwargs=True)
    return module


def guard_checkpoint_loads(monkeypatch, module) -> list:
    """`module.load_checkpoint` loads as asked, and a load on "meta" guards every module of the
    checkpoint (`on_meta_with_guard`); returns the devices asked, in order."""
    real, asked = module.load_checkpoint, []

    def load(path, device="cpu"):
        asked.append(str(device))
        ckpt = real(path, device=device)
        if str(device) == "meta":
            ckpt.modules = {k: on_meta_with_guard(m) for k, m in ckpt.modules.items()}
        return ckpt

    monkeypatch.setattr(module, "load_checkpoint", load)
    return asked


def runs_on_the_model_device(fn) -> BaseException:
    """`fn` must reach the model and get past every forward pass without a device mismatch (it
    then fails where it first needs real numbers, which meta tensors do not have: that error is
    returned)."""
    import pytest

    before = CHECKED["inputs"]
    with pytest.raises(Exception) as e:
        fn()
    assert not isinstance(e.value, WrongDevice), str(e.value)
    # a mismatch outside a module (e.g. pasting CPU pixels into the model's output) is torch's own error
    assert "expected device" not in str(e.value) and "same device" not in str(e.value), str(e.value)
    return e.value
    assert CHECKED["inputs"] > before, f"failed before any forward pass: {e.value}"
