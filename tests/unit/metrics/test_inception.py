"""The Inception-v3 backbone prepares images the way its weights expect: features equal
torchvision's own pipeline for Google's weights (`transform_input=True`), the clean protocol's
resize is PIL's bicubic, and FID on real image sets equals torchmetrics' on the same network."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from latentforge.data import PreparedDataset, prepare_dataset
from latentforge.data.sources import SourceOptions
from latentforge.metrics.distribution import frechet_distance, gaussian_stats
from latentforge.metrics.inception import load_inception, resize_for_inception

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from torchvision.models import inception_v3

    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(weights):
    """torchvision's Inception-v3 as torchvision builds it for Google's weights."""
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    state = {k: v for k, v in torch.load(weights, weights_only=True).items() if not k.startswith("AuxLogits.")}
    net.load_state_dict(state)
    net.fc = nn.Identity()
    return net.eval()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "digits"
    prepare_dataset("digits", root, SourceOptions(count=128, size=28), log=quiet)
    images = PreparedDataset(root).load("train").images[:96]  # (N, 1, 28, 28) uint8
    return images


def _reference_input(images_u8: torch.Tensor) -> torch.Tensor:
    """torchvision's documented preprocessing: [0, 1], resized, ImageNet-normalised."""
    x = images_u8.float().repeat(1, 3, 1, 1) / 255
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD


def test_features_equal_torchvisions_pipeline_for_googles_weights(weights, reference, digits):
    x = digits[:8]
    ours = load_inception(weights, "legacy")
    with torch.no_grad():
        got = ours.features(x.float() / 127.5 - 1)
        want = reference(_reference_input(x))
        # what this module computed before: ImageNet-normalised input to a net without the transform
        old = ours.net(_reference_input(x))
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale
    assert (old - want).abs().max() > 1e-2 * scale  # the test tells the old preprocessing apart


def test_clean_resize_is_pils_antialiased_bicubic_of_the_8bit_image(digits):
    x = digits[:4]
    ours = resize_for_inception(x.float() / 255, "clean")
    for i in range(len(x)):
        pil = Image.fromarray(x[i, 0].numpy().astype(np.float32) / 255, mode="F").resize((299, 299), Image.BICUBIC)
        assert np.abs(ours[i, 0].numpy() - np.asarray(pil)).max() < 2e-3
    legacy = resize_for_inception(x.float() / 255, "legacy")
    assert (legacy - ours).abs().max() > 0.02  # two protocols, never mixed: they differ (4.7% of the range here)


def test_fid_on_real_images_equals_torchmetrics_with_the_same_network(weights, reference, digits):
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Reference(nn.Module):  # torchmetrics hands uint8 images to its feature network
        def forward(self, u8):
            return reference(_reference_input(u8[:, :1]))

    a, b = digits[:48], digits[48:96]
    ours = load_inception(weights, "legacy")
    with torch.no_grad():
        fa, fb = ours.features(a.float() / 127.5 - 1).double(), ours.features(b.float() / 127.5 - 1).double()
    fid_ours = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
    metric = FrechetInceptionDistance(feature=Reference(), input_img_size=(3, 28, 28))
    metric.update(a.repeat(1, 3, 1, 1), real=True)
    metric.update(b.repeat(1, 3, 1, 1), real=False)
    assert fid_ours == pytest.approx(metric.compute().item(), rel=1e-3)


def test_unknown_protocol_is_refused(weights):
    from latentforge.errors import LatentForgeError

    with pytest.raises(LatentForgeError, match="clean, legacy"):
        load_inception(weights, "tf")
