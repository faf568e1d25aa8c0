"""bf16 autocast and channels_last against the fp32 NCHW reference (tiny models, CPU)."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers import preset_input, tiny
from latentforge.algorithms.noise import GlobalNoise
from latentforge.algorithms.precision import Precision
from latentforge.data.dataset import Split
from latentforge.data.spec import DataSpec
from latentforge.config import PRECISION_MODES, load_experiment, preset_names
from latentforge.errors import ConfigError
from latentforge.layout import is_channels_last
from latentforge.models.blocks import TransposedConv2d, _TransposedConvByConvs
from latentforge.models.dcgan import DCGANDiscriminator, DCGANGenerator
from latentforge.sampling import decode_latents
from latentforge.train.batches import InMemoryBatches
from latentforge.train.program import build_program

SPEC = DataSpec((1, 16, 16), 4)


def _split(n=32):
    gen = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 1, 16, 16), generator=gen, dtype=torch.uint8), torch.arange(n) % 4)


def _steps(mode: dict, steps=4, dtypes: set | None = None):
    """Train a tiny conditional GAN; `dtypes` collects the output dtypes of every convolution."""
    cfg = tiny("cdcgan-mnist", train__global_batch_size=8, **mode)
    program = build_program(cfg, SPEC, GlobalNoise(0))
    if dtypes is not None:
        for name in ("generator", "discriminator"):
            for m in program.modules()[name].modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    m.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
    it = InMemoryBatches(_split(), 8, 0).iterate()
    records = [program.step([next(it)], s) for s in range(steps)]
    return records, program.modules()["generator"]


def test_channels_last_outputs_equal_nchw():
    torch.manual_seed(0)
    g = DCGANGenerator(z_dim=8, channels=3, resolution=16, width=8).eval()
    d = DCGANDiscriminator(channels=3, resolution=16, width=8, norm="layer").eval()
    g_cl = copy.deepcopy(g).to(memory_format=torch.channels_last)
    d_cl = copy.deepcopy(d).to(memory_format=torch.channels_last)
    z = torch.randn(4, 8)
    with torch.no_grad():
        x, x_cl = g(z), g_cl(z)
        assert x_cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(x, x_cl, atol=1e-6)
        assert torch.allclose(d(x), d_cl(x.contiguous(memory_format=torch.channels_last)), atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_transposed_conv_by_convs_gives_pytorchs_outputs_and_gradients(channels_last, bf16):
    """TransposedConv2d (its backward as two ordinary convolutions on a channels_last CPU tensor)
    against nn.ConvTranspose2d with the same weights: output, input, weight and bias gradients, in
    fp32 (to 1e-5) and under bf16 autocast (to bf16's resolution, 1e-2), in either layout; same state dict."""
    torch.manual_seed(0)
    ref, new = torch.nn.ConvTranspose2d(6, 5, 4, 2, 1), TransposedConv2d(6, 5, 4, 2, 1)
    new.load_state_dict(ref.state_dict())
    assert list(new.state_dict()) == list(ref.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, g = torch.randn(3, 6, 7, 7).contiguous(memory_format=fmt), torch.randn(3, 5, 14, 14).contiguous(memory_format=fmt)
    seen = []
    for m in (ref, new):
        m.to(memory_format=fmt)
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = m(xx)
        y.backward(g)
        seen.append((y, xx.grad, m.weight.grad, m.bias.grad))
    by_convs = type(seen[1][0].grad_fn).__name__ == "_TransposedConvByConvsBackward"
    assert by_convs == channels_last  # the conv form where it pays, PyTorch's own path elsewhere
    assert is_channels_last(seen[1][0]) == is_channels_last(seen[1][1]) == channels_last
    assert seen[1][0].dtype == seen[0][0].dtype == (torch.bfloat16 if bf16 else torch.float32)
    seen = [[t.float() for t in ts] for ts in seen]
    for a, b, what in zip(*seen, ("output", "input gradient", "weight gradient", "bias gradient")):
        assert (a - b).abs().max() <= (1e-2 if bf16 else 1e-5) * a.abs().max(), what


def test_transposed_conv_by_convs_has_exact_first_and_second_derivatives():
    """gradcheck and gradgradcheck in float64, with groups and output padding: the backward is
    differentiable, so R1, gradient penalties and path length can pass through a generator."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: _TransposedConvByConvs.apply(x, w, b, (2, 2), (1, 1), (1, 1), 2, (1, 1))  # noqa: E731
    assert f(x, w, b).shape == (2, 6, 9, 9)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_transposed_conv_falls_back_where_the_conv_form_cannot_invert_it():
    """Output padding of a stride or more (allowed with dilation) has no inverse as a plain conv:
    PyTorch's own path runs, and the gradients are PyTorch's. Dtype mismatches outside autocast
    raise PyTorch's own error rather than being cast away."""
    torch.manual_seed(0)
    m = TransposedConv2d(4, 4, 3, stride=1, dilation=2, padding=1, output_padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = m(x)
    y.sum().backward()
    assert type(y.grad_fn).__name__ != "_TransposedConvByConvsBackward" and x.grad.shape == x.shape
    bf16_input = x.detach().bfloat16().requires_grad_()
    with pytest.raises(RuntimeError, match="should be the same"):
        TransposedConv2d(4, 4, 4, 2, 1).to(memory_format=torch.channels_last)(bf16_input)


def _images(g):
    z = torch.randn(16, g.z_dim, generator=torch.Generator().manual_seed(1))
    return decode_latents(g, z, torch.arange(16) % 4)


def test_channels_last_training_matches_nchw():
    """Layout changes where numbers live, not what they are: fp32 step metrics agree to 1e-4 and
    the trained generators' images to 5e-3 (Adam turns reduction-order noise in tiny gradients
    into steps of up to lr, hence not bit-identical weights)."""
    nchw, g1 = _steps({"train__channels_last": False})
    nhwc, g2 = _steps({"train__channels_last": True})
    for a, b in zip(nchw, nhwc):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    assert (_images(g1) - _images(g2)).abs().max() < 5e-3


class _LayoutMixes(TorchDispatchMode):
    """Records every op whose same-shaped 4-D tensors come in both layouts (NCHW and NHWC)."""

    def __init__(self, skip_shapes: set):
        super().__init__()
        self.skip_shapes, self.seen = skip_shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        layouts = {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and tuple(t.shape) not in self.skip_shapes \
                    and t.is_contiguous() != t.is_contiguous(memory_format=torch.channels_last):  # one layout only
                layouts.setdefault(tuple(t.shape), set()).add(is_channels_last(t))
        if func is not torch.ops.aten.add.Tensor and any(len(v) > 1 for v in layouts.values()):
            self.seen.append(f"{func} {sorted(layouts)}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", preset_names())
def test_a_channels_last_step_never_mixes_layouts(name):
    """In a channels_last model, no op meets an activation and its gradient (or two activations)
    in different layouts: PyTorch's kernels take a ~20x slower strided path for such a mix, which
    held dcgan-mnist's bf16 step at 1.6-1.7x fp32 (docs/performance.md). One step per preset, every
    pass (D, G, R1, gradient penalty, path length, augmentation) watched. Skipped: `add`, where
    autograd sums a tensor's gradients from two paths (a spectral-normed weight, a gradient
    penalty's second-order terms), and parameter-shaped tensors."""
    cfg = load_experiment(name, {"train.global_batch_size": 8, "train.tracking": "none",
                                 **PRECISION_MODES["fp32+channels_last"]})
    split, spec = preset_input(name)
    program = build_program(cfg, spec, GlobalNoise(0))
    params = {tuple(p.shape) for m in program.modules().values() for p in m.parameters()}
    it = InMemoryBatches(split, 8, 0).iterate()
    program.step([next(it) for _ in range(program.batches_per_step)], 0)
    mixes = _LayoutMixes(params)
    with mixes:
        for step in (1, 2):  # a step at which the lazy regularisers are due, whichever interval
            program.step([next(it) for _ in range(program.batches_per_step)], step)
    assert not mixes.seen, f"{name}: ops given both layouts: {sorted(set(mixes.seen))}"


def test_bf16_steps_agree_with_fp32():
    """Tolerance: every step metric within 5% (or 0.01 absolute) of fp32 over 4 steps; weights stay fp32."""
    seen_fp32, seen_bf16 = set(), set()
    fp32, g1 = _steps({"train__channels_last": False}, dtypes=seen_fp32)
    bf16, g2 = _steps({"train__precision": "bf16", "train__channels_last": True}, dtypes=seen_bf16)
    assert seen_fp32 == {torch.float32} and seen_bf16 == {torch.bfloat16}  # bf16 really ran, every conv
    for a, b in zip(fp32, bf16):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=5e-2, abs=1e-2), (k, a[k], b[k])
    assert all(p.dtype == torch.float32 for p in g2.parameters())
    assert (_images(g1) - _images(g2)).abs().max() < 2e-2


def test_bf16_decoding_is_close_to_fp32():
    torch.manual_seed(0)
    g = DCGANGenerator(z_dim=8, channels=1, resolution=16, width=8)
    z = torch.randn(16, 8)
    a, b = decode_latents(g, z), decode_latents(g, z, precision="bf16")
    assert b.dtype == torch.float32
    assert 0 < (a - b).abs().max() < 0.05  # bf16 really ran, and stays within 0.05 on [-1, 1] pixels


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'; choose one of: fp32, bf16"):
        Precision("fp8")


@pytest.mark.slow
def test_compiled_forward_passes_give_the_same_losses():
    """torch.compile on and off (CPU, inductor): every step metric within 1e-4 relative over 3 steps.
    WGAN-GP's critic stays eager (its penalty differentiates twice); its generator is compiled."""
    for preset in ("vae-mnist", "wgangp-mnist"):
        runs = {}
        for compiled in (False, True):
            cfg = tiny(preset, train__global_batch_size=8, train__compile=compiled)
            program = build_program(cfg, SPEC, GlobalNoise(0))
            it = InMemoryBatches(_split(), 8, 0).iterate()
            runs[compiled] = [program.step([next(it) for _ in range(program.batches_per_step)], s) for s in range(3)]
        for a, b in zip(runs[False], runs[True]):
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (preset, k)


def test_bf16_models_generate_in_fp32_where_bf16_is_only_emulated(monkeypatch):
    from latentforge.algorithms import precision

    assert precision.inference_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": True)
    assert precision.inference_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": False)
    assert precision.inference_precision("bf16", "cpu") == "fp32"


def test_a_bf16_run_where_bf16_is_emulated_says_so_and_how_to_fix_it(monkeypatch, mnist_dir, tmp_path):
    """Without AVX512-BF16/AMX, bf16 autocast runs in software (measured 6x slower than fp32 on an
    AVX2 CPU); training warns once, naming the setting to change, and fp32 runs say nothing."""
    from latentforge.algorithms import precision
    from latentforge.train.local import train_local

    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": False)
    lines: list[str] = []
    train_local(tiny("dcgan-mnist", train__steps=1, train__precision="bf16"), mnist_dir, tmp_path / "bf16", log=lines.append)
    warned = [ln for ln in lines if "emulated" in ln]
    assert len(warned) == 1 and "train.precision=fp32" in warned[0]
    lines.clear()
    train_local(tiny("dcgan-mnist", train__steps=1), mnist_dir, tmp_path / "fp32", log=lines.append)
    assert lines and not any("emulated" in ln for ln in lines)
    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": True)
    assert precision.emulation_warning("bf16", "cpu") is None


def test_auto_precision_is_bf16_only_where_bf16_is_native(monkeypatch):
    """`train.precision=auto` lets one config (a sweep, a job file) train in bf16 on GPUs and
    AVX512-BF16/AMX CPUs and in fp32 where bf16 would be emulated."""
    from latentforge.algorithms import precision

    cfg = tiny("dcgan-mnist", train__precision="auto")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu", native=native: native)
        assert precision.resolve_precision("auto", "cpu") == expected
        assert precision.precision_for(cfg.train, "cpu").name == expected
        assert precision.inference_precision("auto", "cpu") == expected
        assert precision.resolve_precision("fp32", "cpu") == "fp32"
        assert precision.resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("native,expected", [(False, "fp32"), (True, "bf16")])
def test_an_auto_run_records_and_says_the_precision_it_chose(monkeypatch, mnist_dir, tmp_path, native, expected):
    """The checkpoint and the tracker's config store the precision the run trained in, never
    'auto', so generation, Serve and a dashboard read what happened; the log says which one and why."""
    from latentforge.algorithms import precision
    from latentforge.checkpoint import find_checkpoints, load_checkpoint
    from latentforge.train import local
    from latentforge.train.tracking import NullTracker

    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": native)
    tracked: list[dict] = []
    monkeypatch.setattr(local, "make_tracker", lambda kind, name, config, *a: tracked.append(config) or NullTracker())
    lines: list[str] = []
    local.train_local(tiny("dcgan-mnist", train__steps=1, train__precision="auto"), mnist_dir, tmp_path,
                      log=lines.append)
    assert [(c["train"]["precision"], c["train"]["channels_last"]) for c in tracked] == [(expected, True)]
    said = [ln for ln in lines if ln.startswith("train.precision=auto")]
    assert len(said) == 1 and f": {expected} on this cpu" in said[0]
    assert not any("emulated and several times slower" in ln for ln in lines)
    ckpt = load_checkpoint(find_checkpoints(tmp_path)[-1])
    assert ckpt.precision == expected
    assert ckpt.experiment["train"]["channels_last"] is True  # auto, resolved for this CPU
    assert f"device cpu, {expected} + channels_last" in next(ln for ln in lines if ln.startswith("training "))


def test_auto_channels_last_is_on_for_cpus_and_for_bf16_on_cuda(monkeypatch):
    """NHWC by default where it was measured faster (CPUs, fp32 and bf16) and where tensor cores
    want it (bf16 on CUDA); fp32 on CUDA keeps NCHW. The named modes keep their layout."""
    from latentforge.algorithms import precision
    from latentforge.config import PRECISION_MODES, load_experiment

    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": True)
    for value, prec, device, expected in [("auto", "fp32", "cpu", True), ("auto", "bf16", "cpu", True),
                                          ("auto", "fp32", "cuda", False), ("auto", "bf16", "cuda", True),
                                          ("auto", "auto", "cuda", True), (False, "fp32", "cpu", False),
                                          (True, "fp32", "cuda", True)]:
        assert precision.resolve_channels_last(value, prec, device) is expected, (value, prec, device)
    assert load_experiment("dcgan-mnist").train.channels_last == "auto"  # the default
    cfg = load_experiment("dcgan-mnist", {"train.channels_last": "auto"})
    assert precision.precision_for(cfg.train, "cpu").channels_last is True
    assert precision.resolved_config(cfg, "cuda").train.channels_last is False
    nchw = load_experiment("dcgan-mnist", PRECISION_MODES["fp32"])
    assert precision.precision_for(nchw.train, "cpu").channels_last is False
    with pytest.raises(ConfigError, match="channels_last: must be true, false or auto"):
        load_experiment("dcgan-mnist", {"train.channels_last": "sometimes"})


def test_a_resume_in_another_memory_layout_puts_adams_moments_in_the_weights_layout():
    """channels_last is picked per machine (on for a CPU's bf16, off for CUDA fp32): a checkpoint's
    NHWC moments beside NCHW weights were paired by memory order in the fused kernel, so each
    weight was updated with another weight's moments, silently (0.015 off at lr 1e-2 here)."""
    import copy

    from latentforge.algorithms.optim import adam, match_parameter_layouts

    torch.manual_seed(0)
    nhwc = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    nchw = torch.nn.Conv2d(4, 8, 3)
    x = torch.randn(2, 4, 6, 6)
    opt_a = adam(nhwc.parameters(), lr=1e-2, betas=(0.5, 0.9))
    for _ in range(2):
        opt_a.zero_grad()
        nhwc(x.contiguous(memory_format=torch.channels_last)).square().mean().backward()
        opt_a.step()
    nchw.load_state_dict(nhwc.state_dict())
    opt_b = adam(nchw.parameters(), lr=1e-2, betas=(0.5, 0.9))
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a checkpoint file: nothing shared
    match_parameter_layouts(opt_b)
    w = nchw.weight
    assert opt_b.state[w]["exp_avg"].stride() == w.stride()
    for model, opt, inp in ((nhwc, opt_a, x.contiguous(memory_format=torch.channels_last)), (nchw, opt_b, x)):
        opt.zero_grad()
        model(inp).square().mean().backward()
        opt.step()
    torch.testing.assert_close(nchw.weight, nhwc.weight.contiguous(), rtol=1e-6, atol=1e-7)
