#!/usr/bin/env python3
"""Reference outputs of the condition preprocessors: OpenCV's cv2.Canny edge maps of test images.

Run through scripts/fixtures.sh (needs opencv-python-headless, pinned there). Inputs are synthetic
images made here from a seeded generator (smooth "photo-like" fields, noise, shapes, odd sizes,
degenerate sizes) and the committed test images; each case is an input PNG, thresholds and the edge
map cv2.Canny gives for the image as diffusers' examples read it (np.array(load_image(path)), RGB)
or, for "gray" cases, for its single-channel luma. Re-running reproduces byte-identical files.

Outputs (tests/fixtures/edges/):
  cases.json        [{name, input, low, high, l2, channels, output}]
  *.png             inputs and expected edge maps (0 / 255, mode L)
"""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "edges"
IMAGES = ROOT / "tests" / "fixtures" / "images"


def smooth_field(rng, w, h, channels, blur):
    """Blurred noise with a few shapes on top: edges of every direction and strength."""
    noise = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "L"
    img = Image.fromarray(noise if channels == 3 else noise[:, :, 0], mode).filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float32)
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0) * 255.0
    img = Image.fromarray(arr.round().astype(np.uint8), mode)
    d = ImageDraw.Draw(img)
    fill = (230, 40, 90) if channels == 3 else 200
    d.ellipse([w * 0.2, h * 0.25, w * 0.7, h * 0.8], outline=fill, width=2)
    d.line([0, h - 1, w - 1, 0], fill=(20, 200, 60) if channels == 3 else 30, width=1)
    d.rectangle([w * 0.55, h * 0.1, w * 0.9, h * 0.4], fill=(90, 90, 250) if channels == 3 else 120)
    return img


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    rng = np.random.default_rng(1234)
    inputs = {
        "photo": smooth_field(rng, 97, 71, 3, 2.5),
        "photo_gray": smooth_field(rng, 64, 45, 1, 1.5),
        "noise": Image.fromarray(rng.integers(0, 256, size=(29, 33, 3), dtype=np.uint8), "RGB"),
        "ties": Image.fromarray((rng.integers(0, 3, size=(23, 31, 3)) * 100).astype(np.uint8), "RGB"),
        "row": Image.fromarray(rng.integers(0, 256, size=(1, 17, 3), dtype=np.uint8), "RGB"),
        "column": Image.fromarray(rng.integers(0, 256, size=(13, 1, 3), dtype=np.uint8), "RGB"),
        "pixel": Image.fromarray(np.full((1, 1, 3), 77, dtype=np.uint8), "RGB"),
    }
    for name, img in inputs.items():
        img.save(OUT / f"{name}.png")
    # The committed test images (RGB, RGBA, a 16-bit depth map) are read by path.
    files = {name: OUT / f"{name}.png" for name in inputs}
    for name in ["init", "init_rgba", "control", "depth16"]:
        files[name] = IMAGES / f"{name}.png"

    cases = []

    def case(name, src, low, high, l2=False, channels="rgb"):
        img = Image.open(files[src])
        arr = np.array(img.convert("RGB")) if channels == "rgb" else np.array(img.convert("L"))
        edges = cv2.Canny(arr, low, high, L2gradient=l2)
        out = f"{name}_edges.png"
        Image.fromarray(edges, "L").save(OUT / out)
        rel = files[src].relative_to(ROOT / "tests" / "fixtures").as_posix()
        cases.append({"name": name, "input": rel, "low": low, "high": high, "l2": l2, "channels": channels, "output": out, "edge_pixels": int((edges > 0).sum())})

    case("photo_100_200", "photo", 100, 200)
    case("photo_50_150", "photo", 50, 150)
    case("photo_swapped", "photo", 150, 50)
    case("photo_fractional", "photo", 60.7, 140.2)
    case("photo_l2", "photo", 100, 200, l2=True)
    case("photo_l2_low", "photo", 30.5, 90, l2=True)
    case("photo_zero", "photo", 0, 0)
    case("photo_gray", "photo_gray", 40, 120, channels="gray")
    case("photo_gray_rgb", "photo_gray", 40, 120)
    case("noise", "noise", 100, 200)
    case("noise_l2", "noise", 200, 400, l2=True)
    case("ties", "ties", 100, 300)
    case("row", "row", 50, 100)
    case("column", "column", 50, 100)
    case("pixel", "pixel", 100, 200)
    case("init", "init", 100, 200)
    case("init_rgba", "init_rgba", 80, 160)
    case("control", "control", 100, 200)
    case("depth16", "depth16", 20, 60)
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    for c in cases:
        print(f"{c['name']}: {c['edge_pixels']} edge pixels")


if __name__ == "__main__":
    main()
