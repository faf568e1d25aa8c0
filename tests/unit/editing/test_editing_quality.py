"""Editing quality on small trained VAEs (seconds to train): inpainting beats mean-fill,
denoising raises PSNR at every noise level, a class direction reaches its class, and on shapes
a supervised size direction changes size more than position."""

import pytest

from helpers import tiny
from latentforge.editing.quality import edit_eval
from latentforge.train.local import train_local

quiet = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def vae_mnist(mnist_dir, mnist_features, tmp_path_factory):
    run = tmp_path_factory.mktemp("vae_edit")
    cfg = tiny("vae-mnist", train__steps=400, model__width=16, model__z_dim=16, train__global_batch_size=64,
               train__checkpoint_every=400)
    train_local(cfg, mnist_dir, run, log=quiet)
    return run


def test_vae_editing_quality(vae_mnist, mnist_dir):
    r = edit_eval(str(vae_mnist), str(mnist_dir), images=64, project_steps=100, log=quiet)
    # a 400-step tiny VAE: the full-size numbers are in docs/editing.md
    assert r["inpaint_centre_gain_over_mean_fill_db"] > 1.0, r
    assert r["inpaint_centre_optimize_psnr"] > r["inpaint_centre_nn_fill_psnr"], r
    assert r["inpaint_random_gain_over_mean_fill_db"] > 2.0, r
    for sigma in (0.1, 0.2, 0.3):
        assert r[f"denoise_gain_db_sigma{sigma}"] > 0, (sigma, r)
    # judged by the independent grader, not the network whose features fitted the directions
    assert r["grader"].startswith("lf-grader@") and r["grader_accuracy_on_train_split"] > 0.9
    rates = [r[f"dir_class:{c}_target_rate_by_alpha"] for c in range(10)]
    assert sum(rate[-1] for rate in rates) / 10 > 0.5  # most edits reach the target class at the largest α
    assert all(rate[-1] > rate[0] for rate in rates)  # and more of them than before the edit
    assert all(len(r[f"dir_class:{c}_target_rate_by_alpha_self"]) == len(rates[0]) for c in range(10))
    assert 0 <= r["interp_label_changes_at_most_once_rate"] <= 1 and "interp_label_changes_at_most_once_rate_self" in r
    assert (vae_mnist / "step_000400" / "directions" / "directions.json").is_file()  # saved beside it


def test_betavae_size_direction_changes_size_more_than_position(shapes_dir, tmp_path):
    cfg = tiny("betavae-shapes", train__steps=600, model__width=16, model__z_dim=10, train__global_batch_size=32,
               train__checkpoint_every=600, vae__kl_warmup_steps=200)
    train_local(cfg, shapes_dir, tmp_path, log=quiet)
    r = edit_eval(str(tmp_path), str(shapes_dir), images=64, project_steps=50, log=quiet)
    size = r["dir_attr:size_target_change"]
    others = r["dir_attr:size_other_changes"]
    assert size > 0.05, r
    assert size > 2 * max(others["x"], others["y"]), (size, others)
    assert r["dir_attr:size_moves_intended_way_rate"] > 0.7



@pytest.mark.parametrize("preset", ["resnet-mnist", "stylegan2-mnist", "cdcgan-mnist"])
def test_gan_families_go_through_edit_eval(preset, mnist_dir, mnist_features, tmp_path):
    """A ResNet and a StyleGAN2-style checkpoint through every edit-eval measurement: directions
    live in the model's edit space (z, or w for StyleGAN2), and a W+ fit is at least as close as W."""
    from latentforge.editing.directions import load_directions

    cfg = tiny(preset, train__steps=30, train__checkpoint_every=30)
    train_local(cfg, mnist_dir, tmp_path, log=quiet)
    r = edit_eval(str(tmp_path), str(mnist_dir), images=16, project_steps=40, log=quiet)
    dirs = load_directions(tmp_path / "step_000030")
    dim = cfg.model.g_options.get("w_dim", 128) if preset.startswith("stylegan2") else cfg.model.z_dim
    assert {"sefa:0", "pca:0"} <= set(dirs) and all(d.vector.shape == (dim,) for d in dirs.values())
    if preset.startswith("stylegan2"):
        assert r["recon_psnr_wplus"] >= r["recon_psnr"] - 0.1, r
    else:
        assert "recon_psnr_wplus" not in r
    assert "interp_pairs" in r  # the last section ran: a class-conditional GAN crashed there, after every projection
    for judge in ("", "_self"):  # a rate over no between-class path is "not measured", never 0
        assert (r[f"interp_label_changes_at_most_once_rate{judge}"] is None) == (r[f"interp_pairs{judge}"] == 0)
