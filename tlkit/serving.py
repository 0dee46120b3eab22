"""Models logged by tlkit 0.3 carry a code file that imports ImageModel from here; they still load and serve."""

from tlkit.review.serving import ImageModel

__all__ = ["ImageModel"]
