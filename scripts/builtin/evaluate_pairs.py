#!/usr/bin/env python3
"""Issue 20's demonstration, measured: a Noto -> Twemoji model trained by `ldm train` (see README.md
in the repository root, "Training") against simple baselines, on the held-out emoji pairs (pairs.py's
split: none of them was trained on).

  evaluate_pairs.py --ldm target/release/ldm --model TRAINED --pairs PAIRS/heldout --meta PAIRS/pairs.json \
                    --out RESULT.json [--steps 25] [--guidance 1 2]

For every held-out pair (Noto condition, real Twemoji target) each method draws a Twemoji image:
  identity   the Noto image itself (no model)
  builtin    the built-in text-to-image model's img2img from the Noto image with the prompt
             "<label>, twemoji" (12 steps, guidance 5, strength 0.6), what a user could do before
  trained    the trained model from the Noto image (DDIM, --steps, each --guidance)
and is compared with the real Twemoji image: PSNR (RGB, 64x64), a perceptual distance in the
LPIPS style (unit-normalised feature maps of the project's emoji classifier, classifier.py, squared
differences averaged per layer and summed; LPIPS' own weights cannot be fetched here), and the
classifier's category (10) and subcategory (99) accuracy. The classifier's accuracy on the real
Twemoji targets is the ceiling.
"""
import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from classifier import load_classifier, predict


def load(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def features(model, x):
    """The classifier's activations after each block (before pooling), LPIPS' normalisation."""
    out, h = [], x
    for layer in model.features:
        h = layer(h)
        if isinstance(layer, torch.nn.MaxPool2d):
            out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
    return out


def to_tensor(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def perceptual(model, a, b):
    with torch.no_grad():
        fa, fb = features(model, to_tensor(a)), features(model, to_tensor(b))
    return sum(((x - y) ** 2).sum(1).mean((1, 2)) for x, y in zip(fa, fb)).numpy()


def ldm(binary, args, out):
    subprocess.run([binary, "--device", "cpu", "generate", *args, "--out", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return load(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ldm", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    p.add_argument("--limit", type=int, default=0, help="only the first N pairs (a quick check)")
    a = p.parse_args()
    meta = {m["id"]: m for m in json.loads(Path(a.meta).read_text())}
    ids = sorted(f.stem for f in (Path(a.pairs) / "cond").glob("*.png"))
    ids = ids[:a.limit] if a.limit else ids
    clf, info = load_classifier()
    cats, subs = info["categories"], info["subcategories"]
    targets = [load(Path(a.pairs) / "target" / f"{i}.png") for i in ids]
    conds = [load(Path(a.pairs) / "cond" / f"{i}.png") for i in ids]
    methods = {"identity (the Noto image)": conds}
    tmp = Path(tempfile.mkdtemp())
    t0 = time.time()
    methods["built-in model img2img (\"<label>, twemoji\", strength 0.6, 12 steps, guidance 5)"] = [
        ldm(a.ldm, ["--prompt", f"{meta[i]['label']}, twemoji", "--init-image", str(Path(a.pairs) / "cond" / f"{i}.png"), "--strength", "0.6", "--steps", "12", "--guidance", "5", "--seed", str(k)], tmp / "b.png")
        for k, i in enumerate(ids)]
    builtin_s = time.time() - t0
    trained_s = {}
    for g in a.guidance:
        t0 = time.time()
        methods[f"trained Noto->Twemoji model ({a.steps} DDIM steps, guidance {g:g})"] = [
            ldm(a.ldm, ["--model", a.model, "--init-image", str(Path(a.pairs) / "cond" / f"{i}.png"), "--steps", str(a.steps), "--guidance", str(g), "--seed", str(k)], tmp / "t.png")
            for k, i in enumerate(ids)]
        trained_s[g] = time.time() - t0
    methods["real Twemoji (the ceiling)"] = targets
    yc = np.array([cats.index(meta[i]["category"]) for i in ids])
    ys = np.array([subs.index(meta[i]["subcategory"]) if meta[i]["subcategory"] in subs else -1 for i in ids])
    rows = []
    for name, images in methods.items():
        pc, ps = predict(clf, to_tensor(images))
        rows.append({
            "method": name,
            "psnr_db": round(float(np.mean([psnr(x, y) for x, y in zip(images, targets)])), 2),
            "perceptual": round(float(np.mean(perceptual(clf, images, targets))), 4),
            "category_acc": round(float((pc.numpy() == yc).mean()), 4),
            "subcategory_acc": round(float((ps.numpy() == ys).mean()), 4),
        })
        print(json.dumps(rows[-1]))
    grid = np.concatenate([np.concatenate(imgs[:12], axis=1) for imgs in methods.values()], axis=0)
    Image.fromarray(grid).save(Path(a.out).with_suffix(".png"))
    Path(a.out).write_text(json.dumps({"pairs": len(ids), "rows": rows, "seconds": {"builtin": round(builtin_s), **{f"trained_g{g:g}": round(s) for g, s in trained_s.items()}}}, indent=1))


if __name__ == "__main__":
    main()
