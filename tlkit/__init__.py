"""tlkit: transfer learning for small image datasets -> tracked, comparable classifiers.

From Python: `tlkit.load(model)` (predict_proba, predict, classes), `tlkit.baseline(data, ...)`,
`tlkit.finetune(data, ...)` (tlkit/api.py). Importing tlkit loads none of torch, MLflow or timm and configures
nothing; they load with the first call that needs them.
"""

from typing import Any

__version__ = "0.11.0"
__all__ = ["baseline", "finetune", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tlkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
