"""Does a model read the image from its top-left corner? The figures behind the README's "What it found".

    python examples/corner_check.py runs:/FT_ID data/digits-target      # after `tlkit run pipelines/quickstart.yaml`

Prints, for a saved model: its mean saliency over 4x4 blocks of the image, and the fraction of predictions
that change when an 8x8 patch in the top-left corner or in the centre is painted black, grey or white;
then, for untrained resnet18s at 32 and 64 px, which pixels the input gradient of a class score reaches.
"""

import sys
from pathlib import Path

import numpy as np
import timm
import torch

from tlkit.models.network import load_model
from tlkit.review.explain import saliency


def main(model: str, folder: str, n: int = 256) -> None:
    loaded = load_model(model)
    every = sorted(Path(folder).rglob("*.png"))
    paths = every[:: max(1, len(every) // n)][:n]  # spread over the classes
    images = loaded.pixels(paths)
    with torch.no_grad():
        predicted = loaded.network(images).argmax(1)
    size = images.shape[-1]
    heat = saliency(loaded.network, images, predicted).mean(0)
    print(f"{model}: mean saliency over 4x4 blocks of the {size} px image, relative to the mean")
    print(np.round(heat.reshape(4, size // 4, 4, size // 4).mean((1, 3)) / heat.mean(), 2))
    centre = slice(size // 2 - 4, size // 2 + 4)
    for value in (0.0, 0.5, 1.0):
        for name, rows, cols in (("top-left", slice(0, 8), slice(0, 8)), ("centre", centre, centre)):
            painted = images.clone()
            painted[:, :, rows, cols] = value
            with torch.no_grad():
                changed = (loaded.network(painted).argmax(1) != predicted).float().mean()
            print(f"{name:8s} 8x8 painted {value:.1f}: {changed:.1%} of {len(paths)} predictions change")
    torch.manual_seed(0)
    for px in (32, 64):
        net = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()  # residual branches start at zero
        x = torch.rand(16, 3, px, px, requires_grad=True)
        net(x)[:, 0].sum().backward()
        reached = (x.grad.abs().amax(1).sum(0) > 0).nonzero()
        print(
            f"untrained resnet18 at {px} px: input gradient only in rows 0..{int(reached[:, 0].max())}, "
            f"columns 0..{int(reached[:, 1].max())}"
        )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
