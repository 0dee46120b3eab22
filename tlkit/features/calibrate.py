"""Class logits + labels -> a temperature that makes softmax(logits / T) calibrated probabilities.

Temperature scaling (Guo et al. 2017): one scalar, fitted by minimising the negative log-likelihood.
It changes no prediction (argmax is kept), only how confident each one is, so it can be fitted on
data that judged accuracy without changing any accuracy. Where the only data left is the held-out
split, `cross_fitted` scores each held-out image with a temperature fitted on the other folds, so the
calibration error it reports is still held out.
"""

from __future__ import annotations

import numpy as np

MIN_IMAGES = 10  # fewer than this fit no temperature (T = 1): one image would decide it
T_RANGE = (0.02, 50.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in T_RANGE that minimises the NLL of `y` (1.0 with fewer than MIN_IMAGES or a single class)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y)
    if len(y) < MIN_IMAGES or len(np.unique(y)) < 2:
        return 1.0
    found = minimize_scalar(
        lambda log_t: nll(logits, y, float(np.exp(log_t))),
        bounds=np.log(T_RANGE),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(found.x))


def cross_fitted(logits: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> tuple[float, np.ndarray]:
    """(T fitted on all of it, probabilities where each image's T was fitted without it).

    Stratified folds (fewer for small classes); with a class of one image, no folds: T = 1 and the
    probabilities are the plain softmax.
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    present = np.bincount(y)[np.bincount(y) > 0] if len(y) else np.zeros(0, dtype=int)
    k = min(folds, int(present.min())) if len(present) else 0
    if len(y) < MIN_IMAGES or k < 2:
        return 1.0, softmax(logits)
    probs = np.zeros((len(y), logits.shape[1]))
    for fit_on, score_on in StratifiedKFold(k, shuffle=True, random_state=seed).split(logits, y):
        probs[score_on] = softmax(logits[score_on], fit_temperature(logits[fit_on], y[fit_on]))
    return fit_temperature(logits, y), probs


def calibrate_logits(
    heldout: np.ndarray,
    y_heldout: np.ndarray,
    *,
    fit: tuple[np.ndarray, np.ndarray] | None = None,
    given: tuple[float, str] | None = None,
    split: str = "test",
    seed: int = 0,
) -> tuple[float, dict[str, float], str]:
    """A trained model's temperature, its held-out calibration error before and after, and how T was fitted.

    With `given` (a temperature fitted elsewhere, and how: a refit takes the one its selection fit fitted on val),
    T is that one. With `fit` (the logits and labels of a split that is not held out), T is fitted there. Without one,
    T is cross-fitted on the held-out split itself: each held-out image's probability comes from a T
    fitted on the other folds, so the `heldout_ece` reported is still held out; the T returned (for the
    saved model) is fitted on all of it.
    """
    from tlkit.core.metrics import calibration

    if given is not None:
        temperature, how = given
        after = softmax(heldout, temperature)
    elif fit is not None:
        temperature = fit_temperature(*fit)
        after, how = softmax(heldout, temperature), "temperature on the val split (T changes no prediction)"
    else:
        temperature, after = cross_fitted(heldout, y_heldout, seed=seed)
        how = (
            f"temperature cross-fitted on the held-out {split} split (no other split is left: each image's reported "
            "probability comes from a T fitted without it; the saved T from all of it)"
        )
    metrics = {
        "heldout_ece_uncalibrated": calibration(y_heldout, softmax(heldout))[0],
        "heldout_ece": calibration(y_heldout, after)[0],
        "temperature": temperature,
    }
    return temperature, metrics, how
