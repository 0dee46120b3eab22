"""Run a tlkit ONNX export without tlkit or torch: `python onnx_predict.py export/efficientnet_lite0.onnx photo.jpg`.

Needs Pillow, NumPy, OpenCV (opencv-python-headless) and onnxruntime; reads everything else from the sidecar
(export/efficientnet_lite0.json, its "preprocessing"), and prints the probabilities `tlkit predict` gives.
"""

import json
import math
import sys

import cv2
import numpy as np
import onnxruntime
from PIL import Image, ImageOps


def decode(path, side):  # the sidecar's "decode": Pillow, reduced at decode time when larger than `side`
    with Image.open(path) as image:
        if side and min(image.size) > side:
            s = side / min(image.size)
            image.draft("RGB", (math.ceil(image.size[0] * s), math.ceil(image.size[1] * s)))
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):  # 16-bit and float scaled to 8 bits
            a = np.asarray(image, np.float32)
            top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
            top = max(float(a.max()), 1.0) if image.mode == "F" else top
            image = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # transparency composited onto white
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
        image = image.convert("RGB")
    if side and min(image.size) > side:
        w, h = image.size
        size = (side, max(side, round(h * side / w))) if w <= h else (max(side, round(w * side / h)), side)
        image = image.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(image)


def prepare(image, p):  # the sidecar's "resize" and "crop"
    if p["resize"]["library"] == "Pillow":  # a pixels baseline: its square
        h, w = p["resize"]["size"]
        return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    h, w = image.shape[:2]
    k = p["resize"]["short_side"] / min(h, w)
    if (max(1, round(h * k)), max(1, round(w * k))) != (h, w):
        flag = getattr(cv2, p["resize"]["interpolation"])
        image = cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))), interpolation=flag)
    ch, cw = p["crop"]["size"]
    top, left = (image.shape[0] - ch) // 2, (image.shape[1] - cw) // 2
    return image[top : top + ch, left : left + cw]


def main(model, paths):
    sidecar = json.load(open(model.removesuffix(".onnx") + ".json"))
    p = sidecar["preprocessing"]
    batch = np.stack([prepare(decode(path, p["reduce_short_side"]), p) for path in paths]).astype(np.float32) / 255
    x = ((batch - np.float32(p["mean"])) / np.float32(p["std"])).transpose(0, 3, 1, 2)
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x)})[0]
    for path, row in zip(paths, probabilities):
        print(path, json.dumps(dict(zip(sidecar["classes"], row.round(6).tolist()))))
    return probabilities


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
