"""DiffAugment and ADA: what each transform does, that reals and fakes get the same family in
every pass, ADA's probability rule, and its state surviving a checkpoint."""

import copy
import threading

import pytest
import torch

from helpers import tiny
from latentforge.algorithms.augment import AdaState, Augmenter, ada_augment, diff_augment
from latentforge.algorithms.batch import Batch
from latentforge.algorithms.gan import gan_step, make_gan_state
from latentforge.algorithms.noise import GlobalNoise
from latentforge.builders import build_gan
from latentforge.data.spec import DataSpec

SPEC = DataSpec((1, 16, 16), 0, ())


def test_translation_moves_content_and_fills_with_zero():
    x = -torch.ones(1, 1, 16, 16)
    x[0, 0, 8, 8] = 1.0
    u = torch.full((1, 8), 0.5)  # middle of every range: no shift
    same = diff_augment(x, u, ("translation",))
    assert torch.equal(same, x)
    u[0, 3], u[0, 4] = 0.0, 0.999  # the largest shifts: up by 2 rows, right by 2 columns (1/8 of 16)
    moved = diff_augment(x, u, ("translation",))
    assert moved[0, 0, 6, 10] == 1.0 and (moved == 1.0).sum() == 1
    assert (moved[0, 0, -2:, :] == 0).all() and (moved[0, 0, :, :2] == 0).all()  # uncovered rows and columns: zero


def test_cutout_zeroes_a_half_size_square():
    x = torch.ones(2, 3, 16, 16)
    out = diff_augment(x, torch.rand(2, 8), ("cutout",))
    holes = (out == 0).all(dim=1).flatten(1).sum(1)
    assert ((holes > 0) & (holes <= 64)).all()  # at most 8x8, clipped at the border


def test_ada_is_the_identity_at_p_zero_and_changes_images_at_p_one():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    u = torch.rand(4, 32)
    assert torch.equal(ada_augment(x, u, 0.0), x)
    assert (ada_augment(x, u, 1.0) - x).abs().mean() > 0.05
    # at p = 0.3 roughly 0.3 of each transform's draws apply; some images stay unchanged only by chance
    x.requires_grad_(True)
    ada_augment(x, u, 1.0).sum().backward()
    assert x.grad.abs().sum() > 0  # differentiable: G's gradient flows through it


def test_ada_probability_follows_its_rule_on_scripted_discriminator_outputs():
    # p moves by sign(r_t - target) * batch * interval / (kimg * 1000) every `interval` updates
    ada = AdaState(p=0.0, target=0.5, interval=4, kimg=1.0, images_per_update=50)  # 0.2 per adjustment
    positive, negative = torch.ones(50), -torch.ones(50)
    history = []
    for logits in [positive] * 12 + [negative] * 4 + [torch.cat([torch.ones(75), -torch.ones(25)])] * 4:
        ada.observe(logits)
        history.append(round(ada.p, 6))
    assert history[:4] == [0.0, 0.0, 0.0, 0.2]  # changes only at the interval
    assert history[7] == 0.4 and history[11] == 0.6
    assert history[15] == 0.4  # r_t = -1 < 0.5: down
    assert history[19] == 0.4  # r_t = 0.5 exactly: unchanged
    assert ada.last_rt == 0.5
    ada2 = AdaState(p=0.95, target=0.6, interval=1, kimg=1.0, images_per_update=100)
    ada2.observe(positive)
    assert ada2.p == 1.0  # clamped to [0, 1]


def test_ada_probability_is_the_same_on_every_worker():
    """Two workers see different reals; an all-reduced r_t (two threads meeting at a barrier)
    gives both the same p, equal to one process seeing both halves."""
    halves = [torch.cat([torch.ones(30), -torch.ones(2)]), torch.cat([torch.ones(10), -torch.ones(22)])]
    barrier, values = threading.Barrier(2), {}

    def reduce_for(rank):
        def reduce(t):
            values[rank] = t.clone()
            barrier.wait()
            out = (values[0] + values[1]) / 2
            barrier.wait()
            return out
        return reduce

    kw = dict(p=0.5, target=0.3, interval=1, kimg=1.0, images_per_update=64)
    workers = [AdaState(**kw, reduce_mean=reduce_for(r)) for r in (0, 1)]
    threads = [threading.Thread(target=workers[r].observe, args=(halves[r],)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    single = AdaState(**kw)
    single.observe(torch.cat(halves))
    # locally 0.875 and -0.375 would move p in opposite directions; the mean 0.25 < 0.3 moves both down
    assert workers[0].p == workers[1].p == single.p == pytest.approx(0.5 - 64 / 1000)


class SpyAugmenter(Augmenter):
    def __init__(self, kind):
        super().__init__(kind, ada=AdaState(p=0.5) if kind == "ada" else None)
        self.calls = []

    def __call__(self, x, u):
        self.calls.append((x.shape[0], x.requires_grad))
        return super().__call__(x, u)


@pytest.mark.parametrize("kind", ["diffaugment", "ada"])
def test_reals_and_fakes_are_augmented_alike_in_the_d_and_the_g_pass(kind):
    cfg = tiny("dcgan-mnist", model__g_norm="layer", model__d_norm="layer", gan__n_critic=2)
    torch.manual_seed(0)
    g, d = build_gan(cfg.model, SPEC)
    state = make_gan_state(g, d, cfg.gan)
    aug = SpyAugmenter(kind)
    batches = [Batch(torch.rand(8, 1, 16, 16) * 2 - 1) for _ in range(2)]
    m = gan_step(state, batches, GlobalNoise(0), cfg.gan, 0, augment=aug)
    # per D update: reals, then fakes; then the G pass's fakes (with a graph back to G)
    assert aug.calls == [(8, False), (8, False), (8, False), (8, False), (8, True)]
    assert m.aug_p == (0.5 if kind == "ada" else 1.0)


def test_augmentation_changes_what_d_sees_but_not_the_data():
    cfg = tiny("dcgan-mnist", model__g_norm="layer", model__d_norm="layer")
    torch.manual_seed(0)
    g, d = build_gan(cfg.model, SPEC)
    plain, augmented = make_gan_state(copy.deepcopy(g), copy.deepcopy(d), cfg.gan), make_gan_state(g, d, cfg.gan)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    keep = images.clone()
    a = gan_step(plain, [Batch(images)], GlobalNoise(0), cfg.gan, 0)
    b = gan_step(augmented, [Batch(images)], GlobalNoise(0), cfg.gan, 0, augment=Augmenter("diffaugment"))
    assert torch.equal(images, keep)  # augmentation never writes into the batch
    assert a.d_real_logit != b.d_real_logit


def test_ada_probability_is_checkpointed_and_restored(mnist_dir, tmp_path):
    from latentforge.train.local import train_local
    from latentforge.checkpoint import load_training_state

    cfg = tiny("dcgan-mnist", train__steps=8, train__checkpoint_every=4, gan__augment="ada", gan__ada_interval=1,
               gan__ada_kimg=0.5, gan__ada_p_init=0.5)
    train_local(cfg, mnist_dir, tmp_path / "a", log=lambda *_: None)
    ada4 = load_training_state(tmp_path / "a" / "step_000004")["algorithm"]["ada"]
    ada8 = load_training_state(tmp_path / "a" / "step_000008")["algorithm"]["ada"]
    p8 = ada8["p"]
    assert (ada4["updates"], ada8["updates"]) == (4, 8)
    assert {ada4["p"], p8} != {0.5}  # it moved (by 16/500 per update, up or down)
    first = tiny("dcgan-mnist", train__steps=4, train__checkpoint_every=4, gan__augment="ada", gan__ada_interval=1,
                 gan__ada_kimg=0.5, gan__ada_p_init=0.5)
    train_local(first, mnist_dir, tmp_path / "b", log=lambda *_: None)
    train_local(cfg, mnist_dir, tmp_path / "b", resume=True, log=lambda *_: None)
    assert load_training_state(tmp_path / "b" / "step_000008")["algorithm"]["ada"]["p"] == p8


@pytest.mark.parametrize("kind", ["diffaugment", "ada"])
def test_bf16_inputs_get_the_same_transforms_as_fp32(kind):
    """The G pass augments bf16 fakes under autocast: the parameters and the warp stay fp32, so
    the transforms are the ones the D pass applied to fp32 tensors."""
    aug = Augmenter(kind, ada=AdaState(p=0.8) if kind == "ada" else None)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    u = torch.rand(8, aug.n_params)
    u[:, 5:7] = 0.9995  # bf16 would round these to 1.0 and move the cutout off its range
    ref = aug(x, u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = aug(x.bfloat16(), u)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.02  # bf16 rounding of the result only


def test_ada_resumed_mid_interval_on_two_workers_adjusts_as_uninterrupted():
    """ADA's partial sum of signs is each worker's own between adjustments, and rank 0 writes the
    checkpoint: a resume mid-interval gave every worker rank 0's, so the next r_t differed (here
    0.5 instead of 0.0). `sync` before a checkpoint makes the saved sum the workers' mean."""
    import threading

    from latentforge.algorithms.augment import AdaState

    barrier, slots = threading.Barrier(2), [None, None]

    def collective(rank):
        def reduce_mean(t):
            slots[rank] = t.clone()
            barrier.wait()
            out = (slots[0] + slots[1]) / 2
            barrier.wait()
            return out
        return reduce_mean

    signs = {0: 1.0, 1: -1.0}  # rank 0's reals all score above 0, rank 1's all below

    def run(rank, states, resume_after=None, checkpoint=None):
        ada = AdaState(p=0.5, interval=4, reduce_mean=collective(rank))
        if checkpoint is not None:
            ada.load_state_dict(checkpoint)
        for i in range(resume_after or 0, 8) if checkpoint is not None else range(resume_after or 8):
            ada.observe(torch.full((4,), signs[rank]))
        states[rank] = ada

    def both(**kw):
        states = [None, None]
        threads = [threading.Thread(target=run, args=(r, states), kwargs=kw) for r in (0, 1)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        return states

    whole = both()
    first = both(resume_after=6)  # stopped after 6 updates: 2 into the second interval
    for synced in (False, True):  # unsynced first: sync changes the states
        saved = [ada.state_dict() for ada in first]
        if synced:
            threads = [threading.Thread(target=ada.sync, args=("cpu",)) for ada in first]
            [t.start() for t in threads]
            [t.join() for t in threads]
            saved = [ada.state_dict() for ada in first]
        resumed = both(resume_after=6, checkpoint=saved[0])  # every worker loads rank 0's checkpoint
        if synced:
            assert [a.last_rt for a in resumed] == [a.last_rt for a in whole] == [0.0, 0.0]
            assert [a.p for a in resumed] == [a.p for a in whole]
        else:
            assert resumed[0].last_rt == 0.5  # what rank 0's partial sum alone gave
