"""Hub weights, as a user with the network gets them.

Deselected by default (`-m network` runs them) and skipped where the Hugging Face hub cannot be reached.
"""

import pytest
import torch

from tlkit.models import backbone as bb

pytestmark = pytest.mark.network


@pytest.fixture
def hub():
    reason = bb.unreachable("huggingface.co", 3.0)  # only when selected: the default run never waits on it
    if reason is not None:
        pytest.skip(f"the Hugging Face hub is unreachable ({reason})")


def test_pretrained_hub_weights_load_with_their_preprocessing(hub, workdir):
    pretrained = bb.create_backbone("resnet18", pretrained=True)
    random = bb.create_backbone("resnet18", pretrained=False)
    assert pretrained.weights.startswith("hub:")
    assert pretrained.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406), abs=1e-3)  # ImageNet's
    first = dict(pretrained.model.named_parameters())["conv1.weight"]
    assert not torch.equal(first, dict(random.model.named_parameters())["conv1.weight"])
