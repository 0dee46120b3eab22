"""Maps and attacks on a network with a known dependence: trained until it keys on one image corner."""

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from tlkit.core.metrics import calibration
from tlkit.errors import TlkitError
from tlkit.models.backbone import create_model, data_config_for, feature_width
from tlkit.models.network import Network
from tlkit.review.attack import fgsm_accuracy, parse_eps
from tlkit.review.explain import filters_figure, first_conv_filters, gradcam, occlusion, saliency

SIDE, CORNER = 32, 8  # the class is written in the top-left 8x8 corner; everything else is noise


def corner_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.uniform(0.3, 0.7, (n, 3, SIDE, SIDE)).astype(np.float32)
    images[:, :, :CORNER, :CORNER] = np.where(labels[:, None, None, None] == 1, 0.95, 0.05)
    return torch.from_numpy(images), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def corner_network() -> Network:
    torch.manual_seed(0)
    backbone = create_model(TINY_MODEL, img_size=SIDE)
    config = data_config_for(backbone, SIDE)
    network = Network(backbone, torch.nn.Linear(feature_width(backbone), 2), config["mean"], config["std"])
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    images, labels = corner_data(512, seed=0)
    network.train()
    for step in range(60):
        batch = slice((step * 32) % 512, (step * 32) % 512 + 32)
        loss = torch.nn.functional.cross_entropy(network(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    test, y = corner_data(64, seed=1)
    with torch.no_grad():
        assert (network(test).argmax(1) == y).float().mean() > 0.95  # it learned the corner
    return network


def block_mass(maps: np.ndarray) -> np.ndarray:
    """The maps' mass in each 8x8 block of the image (4x4 blocks; the corner is block [0, 0])."""
    return np.clip(maps, 0, None).sum(0).reshape(SIDE // CORNER, CORNER, SIDE // CORNER, CORNER).sum(axis=(1, 3))


def test_saliency_mass_sits_on_the_region_the_network_uses(corner_network):
    images, labels = corner_data(8, seed=2)
    plain = saliency(corner_network, images, labels, samples=1, noise=0.0)  # one gradient (Simonyan et al.)
    smooth = saliency(corner_network, images, labels)  # SmoothGrad, the default
    for maps, ratio in ((plain, 2.0), (smooth, 1.2)):
        assert maps.shape == (8, SIDE, SIDE)
        blocks = block_mass(maps)
        others = np.delete(blocks.ravel(), 0)
        assert blocks[0, 0] == blocks.max(), blocks
        assert blocks[0, 0] > ratio * others.mean(), blocks


def test_smoothgrad_is_repeatable_and_less_speckled_than_one_gradient(corner_network):
    images, labels = corner_data(4, seed=5)
    plain = saliency(corner_network, images, labels, samples=1, noise=0.0)
    smooth = saliency(corner_network, images, labels)
    np.testing.assert_array_equal(smooth, saliency(corner_network, images, labels))  # seeded noise: the same map twice

    def roughness(maps):  # mean jump between neighbouring pixels, relative to the mean value
        return float(np.abs(np.diff(maps, axis=2)).mean() / maps.mean())

    assert roughness(smooth) < 0.8 * roughness(plain)  # 0.69 here, at 32 px where no blur is applied


def test_occluding_the_region_drops_the_probability(corner_network):
    images, labels = corner_data(4, seed=3)
    maps = occlusion(corner_network, images, labels, patch=8, stride=4)
    inside = maps[:, :CORNER, :CORNER].mean()
    outside = maps[:, CORNER:, CORNER:].mean()
    assert inside > 0.1
    assert inside > 5 * abs(outside)  # about half the probability goes when the whole corner is grey


def test_gradcam_has_the_image_size_and_positive_mass(corner_network):
    images, labels = corner_data(3, seed=4)
    maps = gradcam(corner_network, images, labels)
    assert maps.shape == (3, SIDE, SIDE)
    assert maps.sum() > 0
    assert (maps >= 0).all()
    assert block_mass(maps)[0, 0] == block_mass(maps).max()  # on the corner the class is written in


def test_gradcam_handles_transformer_tokens():
    backbone = create_model("test_vit", img_size=SIDE)
    config = data_config_for(backbone, SIDE)
    network = Network(backbone, torch.nn.Linear(feature_width(backbone), 3), config["mean"], config["std"]).eval()
    maps = gradcam(network, torch.rand(2, 3, SIDE, SIDE), torch.tensor([0, 2]))
    assert maps.shape == (2, SIDE, SIDE)
    assert np.isfinite(maps).all()


def test_fgsm_accuracy_falls_as_eps_rises(corner_network):
    images, labels = corner_data(64, seed=5)
    accuracy, examples = fgsm_accuracy(corner_network, images, labels, [0.0, 0.1, 0.5])
    assert accuracy[0.0] > 0.95
    assert accuracy[0.0] >= accuracy[0.1] >= accuracy[0.5]
    assert accuracy[0.5] < 0.5
    assert (examples[0.1] - images[: len(examples[0.1])]).abs().max() <= 0.1 + 1e-6  # the budget holds
    assert parse_eps(["8/255", "0.01,0.02"]) == [0.01, 0.02, 8 / 255]
    with pytest.raises(TlkitError, match="is not a number"):
        parse_eps(["lots"])


def test_ece_of_a_calibrated_predictor_is_about_zero_and_of_an_overconfident_one_is_not():
    rng = np.random.default_rng(0)
    n = 20000
    confidence = rng.uniform(0.5, 1.0, n)
    right = rng.uniform(size=n) < confidence  # right exactly as often as it is confident
    predicted = rng.integers(0, 2, n)
    y_true = np.where(right, predicted, 1 - predicted)
    probs = np.zeros((n, 2))
    probs[np.arange(n), predicted] = confidence
    probs[np.arange(n), 1 - predicted] = 1 - confidence
    ece, bins = calibration(y_true, probs)
    assert ece < 0.02
    assert sum(b["count"] for b in bins) == n
    overconfident = np.where(probs > 0.5, 0.99, 0.01)
    coin = rng.integers(0, 2, n)
    assert calibration(coin, overconfident)[0] > 0.4


def test_first_layer_filters_are_drawn():
    weights = first_conv_filters(create_model("resnet18"))
    assert tuple(weights.shape) == (64, 3, 7, 7)
    figure = filters_figure(weights, "resnet18")
    assert len([a for a in figure.axes if a.images]) == 64


def test_overview_grid_leaves_no_empty_column():
    from tlkit.review.explain import grid_columns

    assert [grid_columns(n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9)] == [1, 2, 3, 4, 3, 3, 4, 4, 3]
