"""`latentforge edit-eval`: how well the editing operations work, measured on the validation split.

Reported (all PSNRs on [0, 1] pixels, masked-region PSNR counts only the missing pixels):
- reconstruction PSNR/SSIM (encoder for VAEs, projection for GANs)
- inpainting PSNR on the masked region, centre and random masks, against a mean-fill
  (per-pixel training mean) and a nearest-neighbour fill (the training image closest on the
  observed pixels) baseline
- denoising PSNR gain at σ = 0.1, 0.2, 0.3
- per direction: how often the edit moves the image to the target class (or the measured
  shapes factor the intended way) as α grows, and how much everything else moves
- interpolation: share of paths between two different classes whose label changes at most
  once; norm preservation of slerp against lerp

Classes are judged by the dataset's independent grader (metrics.grader: another architecture,
seed and training split than the feature network that fitted the class boundaries); the feature
network's own verdicts are reported beside them (`..._self`), so the gap shows how much of an
edit only convinces the network that drew it.
"""

from __future__ import annotations

import math
import time

import torch

from latentforge.data.dataset import PreparedDataset
from latentforge.errors import ConfigError

from latentforge.images import to_model_range
from latentforge.editing.directions import apply_edit, compute_directions, load_directions, save_directions
from latentforge.editing.inversion import invert, project
from latentforge.editing.latent import interpolation_path
from latentforge.editing.space import default_interpolation, edit_model, random_latents
from latentforge.editing.restoration import denoise, inpaint, paste
from latentforge.metrics.reconstruction import psnr, ssim
from latentforge.sampling import decode_latents

ALPHAS = (0.0, 1.0, 2.0, 3.0, 4.0)
INPAINT_STARTS = 8  # GAN inpainting: fits averaged


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, [0, 1] pixels) over the missing pixels only (mask = 0), per image."""
    missing = (1 - mask.float()).expand_as(target)
    err = (((pred - target) / 2) ** 2 * missing).flatten(1).sum(1) / missing.flatten(1).sum(1).clamp_min(1)
    return (10 * torch.log10(1.0 / err.clamp_min(1e-10))).clamp(max=100.0)


def centre_mask(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """(N, 1, H, W): the central square of half the side is missing."""
    m = torch.ones(n, 1, h, w)
    m[:, :, h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = 0
    return m


def random_mask(n: int, c: int, h: int, w: int, seed: int = 0, block: int = 4, missing: float = 0.4) -> torch.Tensor:
    """(N, 1, H, W): random blocks missing, about `missing` of the area."""
    gen = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(n, 1, math.ceil(h / block), math.ceil(w / block), generator=gen) > missing).float()
    return torch.nn.functional.interpolate(coarse, scale_factor=block, mode="nearest")[:, :, :h, :w]


def nearest_neighbour_fill(images: torch.Tensor, mask: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Fill the missing pixels from the training image closest on the observed pixels."""
    m = mask.float().expand_as(images)
    out = []
    for x, mi in zip(images, m):
        d = (((train - x) * mi) ** 2).flatten(1).sum(1)
        out.append(paste(x[None], train[d.argmin()][None], mi[None])[0])
    return torch.stack(out)


def measure_shape_factors(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Read the shapes factors off images: size (the lit bounding box's larger side, which is the
    shape's side for squares, circles and triangles alike), x, y (centre of that box), in [0, 1]."""
    lit = ((images.amax(1) + 1) / 2 > 0.25)  # (N, H, W)
    n, h, w = lit.shape
    idx_x = torch.arange(w, dtype=torch.float32)
    idx_y = torch.arange(h, dtype=torch.float32)
    cols, rows = lit.any(1).float(), lit.any(2).float()  # (N, W), (N, H)
    big = 1e6

    def extent(mask, idx):
        first = (idx + big * (1 - mask)).min(1).values
        last = (idx - big * (1 - mask)).max(1).values
        empty = mask.sum(1) == 0
        return torch.where(empty, 0.0, first), torch.where(empty, 0.0, last)

    x0, x1 = extent(cols, idx_x)
    y0, y1 = extent(rows, idx_y)
    side = torch.maximum(x1 - x0 + 1, y1 - y0 + 1) * (cols.sum(1) > 0)
    return {"size": side / max(h, w), "x": (x0 + x1) / 2 / (w - 1), "y": (y0 + y1) / 2 / (h - 1)}


def edit_eval(checkpoint: str, dataset_dir: str, images: int | None = None, seed: int = 0,
              project_steps: int = 150, restarts: int = 2, device: str = "cpu", log=print) -> dict:
    """Measure every editing operation on a checkpoint; also computes and saves its directions.

    `device` runs the model there (projections, decoding); images, latents and the measurements
    stay on the CPU, and the dataset's feature network and grader judge there as everywhere else.
    Missing directions are computed from the checkpoint loaded again on the CPU (an eigenvector's
    sign is up to the linear-algebra build: CPU directions are the ones Serve and `directions` make)."""
    import copy

    from latentforge.checkpoint import load_checkpoint
    from latentforge.devices import on_device
    from latentforge.metrics.features import ensure_feature_net

    t0 = time.time()
    if images is not None and images < 1 or project_steps < 1 or restarts < 1:
        raise ConfigError(f"--images ({images}), --project-steps ({project_steps}) and --restarts ({restarts}) must "
                          "each be at least 1")
    ck = load_checkpoint(checkpoint, device=device)
    ds = PreparedDataset(dataset_dir)
    ck.check_dataset(ds, log=log)
    net = ensure_feature_net(dataset_dir, log=log)
    # a GAN projection's perceptual term runs beside the model; a copy, the cached network stays put
    project_net = net.model if on_device(net.model, device) or ck.algorithm != "gan" else copy.deepcopy(net.model).to(device)
    model, algo = edit_model(ck.inference_generator()), ck.algorithm  # W models are edited in W
    classifier = net.model if net.model.head is not None else None
    grader = None
    if classifier is not None:
        from latentforge.metrics.grader import ensure_grader

        grader = ensure_grader(dataset_dir, log=log)
    n = images if images is not None else (64 if algo == "gan" else 256)
    val, train = ds.load("val"), ds.load("train")
    x = to_model_range(val.images[:n])
    n = x.shape[0]  # a small validation split may hold fewer
    y_true = None if val.labels is None else val.labels[:n]
    y_cond = y_true if model.num_classes else None
    _, c, h, w = x.shape
    proj = dict(steps=project_steps, restarts=restarts, seed=seed)
    # inpainting fills with the mean of several fits (the posterior mean minimises squared error);
    # a VAE starts from its encoder, so one fit is enough
    inpaint_proj = proj if algo == "vae" else dict(proj, restarts=INPAINT_STARTS, average=INPAINT_STARTS)
    out: dict = {"checkpoint": str(ck.path), "algorithm": algo, "images": n, "backbone": net.backbone, "seed": seed}
    if grader is not None:
        out.update({"grader": grader.name, "grader_accuracy_on_train_split": grader.accuracy})

    # 1. reconstruction
    inv = invert(model, algo, x, y_cond, feature_net=project_net, **({} if algo == "vae" else proj))
    out["recon_psnr"] = float(psnr(inv.reconstruction, x).mean())
    out["recon_ssim"] = float(ssim(inv.reconstruction, x).mean())
    log(f"  reconstruction: PSNR {out['recon_psnr']:.2f} dB, SSIM {out['recon_ssim']:.3f}")
    if hasattr(model, "num_ws"):  # a W model: W+ (one w per layer) fits closer than W
        inv_plus = project(model, x, y_cond, feature_net=project_net, plus=True, **proj)
        out["recon_psnr_wplus"] = float(psnr(inv_plus.reconstruction, x).mean())
        log(f"  reconstruction in W+: PSNR {out['recon_psnr_wplus']:.2f} dB")

    # 2. inpainting vs baselines
    train_x = to_model_range(train.images[:5000])
    mean_image = train_x.mean(0, keepdim=True)
    methods = ["optimize", "chain"] if algo == "vae" else ["optimize"]
    for mask_name, mask in (("centre", centre_mask(n, c, h, w)), ("random", random_mask(n, c, h, w, seed))):
        res = {"mean_fill": masked_psnr(paste(x, mean_image.expand_as(x), mask), x, mask),
               "nn_fill": masked_psnr(nearest_neighbour_fill(x, mask, train_x), x, mask)}
        for m in methods:
            filled, _ = inpaint(model, algo, x, mask, y_cond, method=m, **({} if m == "chain" else inpaint_proj))
            res[m] = masked_psnr(filled, x, mask)
            assert torch.equal(filled * mask, x * mask), "inpainting must keep the observed pixels"
        for k, v in res.items():
            out[f"inpaint_{mask_name}_{k}_psnr"] = float(v.mean())
        best = max(methods, key=lambda m: float(res[m].mean()))
        out[f"inpaint_{mask_name}_gain_over_mean_fill_db"] = float(res[best].mean() - res["mean_fill"].mean())
        log(f"  inpainting ({mask_name}): " + ", ".join(f"{k} {float(v.mean()):.2f} dB" for k, v in res.items()))

    # 3. denoising
    gen = torch.Generator().manual_seed(seed + 1)
    for sigma in (0.1, 0.2, 0.3):
        noisy = (x + 2 * sigma * torch.randn(x.shape, generator=gen)).clamp(-1, 1)  # σ on [0, 1] pixels
        clean = denoise(model, algo, noisy, y_cond, **({} if algo == "vae" else proj))
        gain = float(psnr(clean, x).mean() - psnr(noisy, x).mean())
        out[f"denoise_gain_db_sigma{sigma}"] = gain
        log(f"  denoising σ={sigma}: PSNR gain {gain:+.2f} dB")

    # 4. directions (computed once, saved beside the checkpoint)
    directions = load_directions(ck.path)
    if not directions:
        computed = compute_directions(ck if on_device(model, "cpu") else load_checkpoint(ck.path), ds, net, seed=seed)
        save_directions(ck.path, computed)
        directions = {d.name: d for d in computed}
    out["directions"] = sorted(directions)
    if algo == "vae":
        z_src = inv.latent  # edit real validation images
    else:
        z_src = random_latents(model, n, torch.Generator().manual_seed(seed + 2), y_cond)  # W models map with labels
    with torch.no_grad():
        src_images = decode_latents(model, z_src, y_cond)
        src_feats = net.embed(src_images)[0]
    typical = torch.cdist(src_feats, src_feats).mean().item()
    for name, d in sorted(directions.items()):
        if name.startswith("class:") and classifier is not None:
            target = int(name.split(":")[1])
            rates, self_rates, dists = [], [], []
            for a in ALPHAS:
                edited = decode_latents(model, apply_edit(z_src, d.vector, a), y_cond)
                feats, probs = net.embed(edited)
                rates.append(float((grader.predict(edited) == target).float().mean()))
                self_rates.append(float((probs.argmax(1) == target).float().mean()))
                dists.append(float((feats - src_feats).norm(dim=1).mean() / typical))
            out[f"dir_{name}_target_rate_by_alpha"] = rates  # the independent grader's verdict
            out[f"dir_{name}_target_rate_by_alpha_self"] = self_rates  # the boundary-fitting network's
            out[f"dir_{name}_feature_shift_at_max_alpha"] = dists[-1]
        elif name.startswith("attr:") and ds.attributes:
            factor = name.split(":")[1]
            measured0 = measure_shape_factors(src_images)
            if factor not in measured0:
                continue
            changes = {}
            for a in (-2.0, 2.0):
                edited = decode_latents(model, apply_edit(z_src, d.vector, a), y_cond)
                m = measure_shape_factors(edited)
                changes[a] = {k: (m[k] - measured0[k]) for k in m}
            target_move = (changes[2.0][factor] - changes[-2.0][factor]).mean().item()
            others = {k: (changes[2.0][k] - changes[-2.0][k]).abs().mean().item() for k in changes[2.0] if k != factor}
            out[f"dir_{name}_target_change"] = target_move
            out[f"dir_{name}_other_changes"] = others
            out[f"dir_{name}_moves_intended_way_rate"] = float(((changes[2.0][factor] - changes[-2.0][factor]) > 0).float().mean())
    # 5. interpolation
    if classifier is not None and y_true is not None:
        pairs, smooth, self_pairs, self_smooth = 0, 0, 0, 0
        if algo == "vae":
            idx_a, idx_b = [], []
            for i in range(n):
                j = (i + 1) % n
                if y_true[i] != y_true[j]:
                    idx_a.append(i)
                    idx_b.append(j)
            za, zb = inv.latent[idx_a], inv.latent[idx_b]
            ya = y_cond[idx_a] if y_cond is not None else None
        else:
            g2 = torch.Generator().manual_seed(seed + 3)
            # a class-conditional GAN decodes (and a W model maps) nothing without labels: each path
            # keeps one class, cycling through them, as a conditional VAE's path keeps its first
            # endpoint's; such a path rarely changes class, which interp_pairs counts
            ya = torch.arange(n) % model.num_classes if model.num_classes else None
            za, zb = random_latents(model, n, g2, ya), random_latents(model, n, g2, ya)
        norm_dev = {"slerp": [], "lerp": []}
        for i in range(len(za)):
            for method in ("slerp", "lerp"):
                path = interpolation_path(za[i], zb[i], 9, method)
                t = torch.linspace(0, 1, 9)
                expected = (1 - t) * za[i].norm() + t * zb[i].norm()  # endpoint norms, blended
                norm_dev[method].append(float(((path.norm(dim=1) - expected).abs() / expected).max()))
            path = interpolation_path(za[i], zb[i], 9, default_interpolation(model, algo))
            labels = None if ya is None else ya[i].repeat(9)
            frames = decode_latents(model, path, labels)
            for preds, judge in ((grader.predict(frames), "grader"), (net.embed(frames)[1].argmax(1), "self")):
                if preds[0] == preds[-1]:
                    continue  # endpoints of the same class: not a between-class path
                once = int((preds[1:] != preds[:-1]).sum() <= 1)
                if judge == "grader":
                    pairs, smooth = pairs + 1, smooth + once
                else:
                    self_pairs, self_smooth = self_pairs + 1, self_smooth + once
        # no between-class path (a conditional GAN's paths keep their class): not measured, rather
        # than a rate of 0 that reads as every path failing
        out["interp_pairs"] = pairs
        out["interp_label_changes_at_most_once_rate"] = smooth / pairs if pairs else None
        out["interp_pairs_self"] = self_pairs
        out["interp_label_changes_at_most_once_rate_self"] = self_smooth / self_pairs if self_pairs else None
        out["interp_slerp_max_norm_deviation"] = sum(norm_dev["slerp"]) / max(1, len(norm_dev["slerp"]))
        out["interp_lerp_max_norm_deviation"] = sum(norm_dev["lerp"]) / max(1, len(norm_dev["lerp"]))
    out["seconds"] = round(time.time() - t0, 1)
    return out
