"""The evaluation metrics a run reports while it trains (and a sweep can optimise), each with the
direction in which it is better. One list: the periodic evaluator reports these, sweep files are
validated against them."""

from __future__ import annotations

# name -> "min" (lower is better) or "max"
REPORTED_METRICS: dict[str, str] = {
    "fid": "min", "kid": "min", "precision": "max", "recall": "max", "density": "max", "coverage": "max",
    "inception_score": "max", "class_coverage": "max", "label_kl": "min", "class_accuracy": "max",
    # VAEs only: reconstruction of the validation split
    "recon_psnr": "max", "recon_ssim": "max", "val_neg_elbo": "min",
}
VAE_ONLY_METRICS = ("recon_psnr", "recon_ssim", "val_neg_elbo")
LABELLED_DATA_METRICS = ("inception_score", "class_coverage", "label_kl", "class_accuracy")  # need the classifier's classes
CONDITIONAL_MODEL_METRICS = ("class_accuracy",)  # the share of images of the class they were asked for
