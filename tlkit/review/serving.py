"""The served model: request rows of encoded images -> class and calibrated probabilities (an MLflow pyfunc).

`mlflow models serve -m runs:/RUN_ID/model` runs `ImageModel`. Each request row is one image, as
base64 text (a `data:image/...;base64,` prefix is allowed) or as bytes (the Python API). The answer
for an image equals `tlkit predict` on the same file: the bytes are decoded as a file is (JPEG at
reduced size, EXIF orientation), then scored by the same float32 network (tlkit.models.network).

What a client cannot do:
- make the server open a file: text is base64 or refused, never a path;
- send more than TLKIT_SERVE_MAX_REQUEST_MB of image data in one request (default 32), an image of
  more than TLKIT_SERVE_MAX_PIXELS pixels (default 40 million), or images of more than
  TLKIT_SERVE_MAX_REQUEST_PIXELS pixels together (default 100 million; both read from the headers before any
  decoding: 24 photos of 36 MP in a 1 MB request would otherwise take seconds of CPU and a gigabyte);
- send a table with another column than 'image' (a misspelt column is not taken for it);
- send another format than JPEG, PNG, WebP, TIFF, BMP or GIF, the formats photos and scans come in (Pillow's other
  decoders are not reachable); every mode tlkit trains on is read as in training (16-bit, CMYK, palette, alpha).
Each refusal is HTTP 400 with one line naming the input and the limit: no stack trace, nothing of the
request echoed back.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
from dataclasses import dataclass

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
NOT_AN_IMAGE = "not a base64-encoded image (JPEG, PNG, WebP, TIFF, BMP or GIF)"
MAX_REQUEST_MB = 32.0
MAX_PIXELS = 40_000_000
MAX_REQUEST_PIXELS = 100_000_000

log = logging.getLogger("tlkit.review.serving")


class Refused(MlflowException):
    """An error answered as one line, with no stack trace and nothing of the request.

    MLflow's scoring server rewrites the message of an MlflowException raised by a model to
    "Failed to predict data '<the request>'. Error: ..." (mlflow.pyfunc.scoring_server.invocations),
    which echoes the input back; this exception keeps the message it was made with.
    """

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE):
        self._line = message
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:  # the scoring server's rewrite, which would echo the request
        pass


@dataclass(frozen=True)
class Limits:
    """What one request may hold, from the environment of the serving process."""

    max_bytes: int
    max_pixels: int  # one image
    max_request_pixels: int  # all the images of a request together


def limits() -> Limits:
    try:
        megabytes = float(os.environ.get("TLKIT_SERVE_MAX_REQUEST_MB", MAX_REQUEST_MB))
        pixels = int(float(os.environ.get("TLKIT_SERVE_MAX_PIXELS", MAX_PIXELS)))
        request_pixels = int(float(os.environ.get("TLKIT_SERVE_MAX_REQUEST_PIXELS", MAX_REQUEST_PIXELS)))
    except ValueError:
        raise Refused(
            "TLKIT_SERVE_MAX_REQUEST_MB, TLKIT_SERVE_MAX_PIXELS and TLKIT_SERVE_MAX_REQUEST_PIXELS must be numbers; "
            "fix the server's environment",
            INTERNAL_ERROR,
        ) from None
    return Limits(int(megabytes * 2**20), pixels, request_pixels)


def image_bytes(value, index: int) -> bytes:
    """One request value -> the encoded image's bytes. Text is base64, never a path."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text[:100]:
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(f"input {index}: {NOT_AN_IMAGE}") from None
    raise Refused(f"input {index}: expected base64 text or bytes, got {type(value).__name__}")


def check_image(data: bytes, index: int, max_pixels: int) -> int:
    """Refuse anything but an image of FORMATS within the pixel limit, from its header alone; its pixel count."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001  any decoder complaint means the same to the client
        raise Refused(f"input {index}: {NOT_AN_IMAGE}") from None
    if width * height > max_pixels:
        raise Refused(
            f"input {index}: {width}x{height} is {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:g} (TLKIT_SERVE_MAX_PIXELS)"
        )
    return width * height


def decode_request(values: list, decode, *, limit: Limits) -> list:
    """Request values -> decoded images (`decode(file, formats=...)` reads one), every check before any decoding."""
    size = sum(len(v) for v in values if isinstance(v, (str, bytes, bytearray, memoryview)))
    if size > limit.max_bytes:
        raise Refused(
            f"request of {size / 2**20:.1f} MB is above the limit of {limit.max_bytes / 2**20:g} MB "
            "(TLKIT_SERVE_MAX_REQUEST_MB); "
            "send fewer or smaller images per request"
        )
    if not values:
        raise Refused("the request holds no images; send one row per image, column 'image'")
    encoded = [image_bytes(v, i) for i, v in enumerate(values)]
    pixels = sum(check_image(data, i, limit.max_pixels) for i, data in enumerate(encoded))
    if pixels > limit.max_request_pixels:
        raise Refused(
            f"the request's {len(encoded)} images hold {pixels / 1e6:.1f} megapixels together, above the limit of "
            f"{limit.max_request_pixels / 1e6:g} (TLKIT_SERVE_MAX_REQUEST_PIXELS); send fewer or smaller images per "
            "request"
        )
    images = []
    for i, data in enumerate(encoded):
        try:
            images.append(decode(io.BytesIO(data), formats=FORMATS))
        except Exception:  # noqa: BLE001  a header that passed, a body that does not decode (truncated)
            raise Refused(f"input {i}: the image data is damaged and does not decode") from None
    return images


class ImageModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]  # mlflow.pyfunc's lazy attributes
    """A tlkit model as an MLflow pyfunc: one image per row in, its class and a probability per class out."""

    # Inputs are a column of base64 strings or bytes, which MLflow's type-hint validation cannot
    # express; MLflow's own opt-out, without its warning on every import.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from tlkit.models.network import load_model

        self.model = load_model(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        columns = [str(c) for c in getattr(model_input, "columns", [])]
        if columns != ["image"]:
            raise Refused(
                f"expected a table with one column, 'image', of one image per row; got {len(columns)} column(s)"
                f"{'' if 'image' in columns else ', none named image'}; see docs/serving.md"
            )
        images = decode_request(list(model_input["image"]), self.model.decode, limit=limits())
        try:
            probabilities = self.model.predict_proba(images)
        except Exception:  # a bug, not the client's input: the trace goes to the server's log, one line to the client
            log.exception("scoring failed")
            raise Refused("internal error while scoring; the server's log has the details", INTERNAL_ERROR) from None
        classes = self.model.classes
        frame = pd.DataFrame(probabilities, columns=classes)
        frame.insert(0, "class", [classes[i] for i in probabilities.argmax(axis=1)])
        return frame
