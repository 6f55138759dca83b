#!/usr/bin/env python3
"""PIL's conversions, resizes and Gaussian blur on seeded images, for src/pipelines/image_input.rs.

Writes tests/fixtures/ref/pil_images.safetensors: for each case `NAME.in` (uint8 [H, W, C]) and
`NAME.out`; the case parameters are in the tensor names (see CASES). Deterministic.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "ref" / "pil_images.safetensors"
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def image(rng, w, h, mode):
    c = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    # smooth content plus noise and hard edges, so rounding and ringing both show
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx[..., None] * (0.3 + 0.1 * np.arange(c)) + yy[..., None] * 0.21)
    base[(xx // 5 + yy // 4) % 3 == 0] = 250
    arr = np.clip(base + rng.normal(0, 20, (h, w, c)), 0, 255).astype(np.uint8)
    return arr


def main():
    rng = np.random.default_rng(7)
    t = {}
    cases = [
        ("rgb_lanczos_down", 37, 23, "RGB", (16, 11), "lanczos"),
        ("rgb_lanczos_up", 13, 9, "RGB", (32, 27), "lanczos"),
        ("rgb_lanczos_mixed", 40, 17, "RGB", (24, 33), "lanczos"),
        ("l_lanczos_down", 61, 45, "L", (20, 15), "lanczos"),
        ("l_bicubic_mixed", 30, 20, "L", (13, 31), "bicubic"),
        ("rgb_bilinear_down", 33, 29, "RGB", (10, 12), "bilinear"),
        ("rgb_lanczos_width_only", 25, 14, "RGB", (16, 14), "lanczos"),
        ("rgb_lanczos_height_only", 25, 14, "RGB", (25, 31), "lanczos"),
    ]
    for name, w, h, mode, size, f in cases:
        arr = image(rng, w, h, mode)
        img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
        out = np.asarray(img.resize(size, resample=FILTERS[f]))
        t[f"{name}.in"] = torch.from_numpy(arr.copy())
        t[f"{name}.out"] = torch.from_numpy(out.reshape(size[1], size[0], -1).copy())
    for name, w, h, radius in [("l_blur_4", 41, 30, 4), ("l_blur_1.5", 23, 17, 1.5), ("l_blur_9", 12, 50, 9)]:
        arr = image(rng, w, h, "L")
        out = np.asarray(Image.fromarray(arr[..., 0], "L").filter(ImageFilter.GaussianBlur(radius)))
        t[f"{name}.in"] = torch.from_numpy(arr.copy())
        t[f"{name}.out"] = torch.from_numpy(out.reshape(h, w, 1).copy())
    for name, w, h in [("rgb_to_l", 17, 11), ("rgba_to_l", 9, 8)]:
        mode = "RGBA" if name.startswith("rgba") else "RGB"
        arr = image(rng, w, h, mode)
        out = np.asarray(Image.fromarray(arr, mode).convert("L"))
        t[f"{name}.in"] = torch.from_numpy(arr.copy())
        t[f"{name}.out"] = torch.from_numpy(out.reshape(h, w, 1).copy())
    save_file(t, str(OUT), metadata={"format": "pt"})
    print(f"wrote {OUT} ({len(t) // 2} cases)")


if __name__ == "__main__":
    main()
