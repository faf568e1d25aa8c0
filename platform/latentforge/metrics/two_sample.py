"""Classifier two-sample test (C2ST, Lopez-Paz & Oquab 2017).

A fresh discriminator is trained to tell real from generated images; its held-out accuracy is
near 1.0 when the generator is easy to tell apart and falls towards 0.5 as samples become
indistinguishable from data. Cheap, needs no pretrained network, and cannot be gamed by a
generator that never saw this classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentforge.models.dcgan import DCGANDiscriminator


def c2st_accuracy(real: torch.Tensor, fake: torch.Tensor, steps: int = 200, batch_size: int = 64,
                  width: int = 16, lr: float = 2e-4, seed: int = 0, holdout: float = 0.5) -> float:
    """Held-out accuracy of a fresh classifier trained to separate `real` from `fake`.

    Args:
        real, fake: (N, C, H, W) in [-1, 1], same shape; each is split into train and held-out halves.
        steps: classifier updates.
        batch_size: images per class per update.
        width: classifier width.
        seed: seeds the classifier and its batches.
        holdout: share of each set held out for the accuracy.

    Returns:
        Accuracy on the held-out halves, in [0, 1] (0.5 = indistinguishable).
    """
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real {tuple(real.shape[1:])} and fake {tuple(fake.shape[1:])} images differ in shape")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = min(len(real), len(fake))
    n_test = max(1, int(n * holdout))
    real, fake = real[:n], fake[:n]
    c, h, _ = real.shape[1:]
    clf = DCGANDiscriminator(channels=c, resolution=h, width=width, norm="none")
    opt = torch.optim.Adam(clf.parameters(), lr=lr, betas=(0.5, 0.999))
    r_train, f_train = real[n_test:], fake[n_test:]
    for _ in range(steps):
        ri = torch.randint(0, len(r_train), (batch_size,), generator=gen)
        fi = torch.randint(0, len(f_train), (batch_size,), generator=gen)
        logits = clf(torch.cat([r_train[ri], f_train[fi]]))
        target = torch.cat([torch.ones(batch_size), torch.zeros(batch_size)])
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        correct = (clf(real[:n_test]) > 0).float().sum() + (clf(fake[:n_test]) <= 0).float().sum()
    return float(correct / (2 * n_test))
