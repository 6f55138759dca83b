#!/usr/bin/env python3
"""The built-in model's training data: openly licensed emoji artwork with captions.

Sources (installed by `npm ci` in this folder, pinned by package-lock.json):
  emoji-datasource-google 16.0.0   Noto Emoji images, Apache-2.0 (package README: "Android/Google/Noto images,
                                   are available under the Apache License 2.0")
  emoji-datasource-twitter 16.0.0  Twemoji images, CC-BY-4.0 (package README: "Twitter images are available
                                   under the Creative Commons Attribution 4.0 license")
  emojibase-data 17.0.0            English labels and tags, MIT
The skin-tone variants are left out (they would make "People & Body" three quarters of the set).

Writes WORK/emoji64.npz: images uint8 [N, 64, 64, 3] (alpha composited over white), and
WORK/emoji64.json: per image its emoji id, style, label, short names, tags, category, subcategory and
split ("train" or "heldout": 5% of the emoji, both styles, chosen by a hash of the code point).
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MODULES = HERE / "node_modules"
STYLES = {"noto": ("emoji-datasource-google", "google"), "twemoji": ("emoji-datasource-twitter", "twitter")}
HELDOUT_PERCENT = 5


def heldout(unified: str) -> bool:
    return int(hashlib.sha256(unified.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def load_rgb(path: Path) -> np.ndarray:
    im = Image.open(path).convert("RGBA")
    if im.size != (64, 64):
        raise SystemExit(f"{path}: expected 64x64, got {im.size}")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, im).convert("RGB"), dtype=np.uint8)


def build(work: Path) -> None:
    if not (MODULES / "emoji-datasource-google" / "emoji.json").exists():
        raise SystemExit(f"emoji packages missing: run `npm ci` in {HERE}")
    emoji = json.loads((MODULES / "emoji-datasource-google" / "emoji.json").read_text())
    base = json.loads((MODULES / "emojibase-data" / "en" / "data.json").read_text())
    by_hex = {e["hexcode"].replace("-FE0F", ""): e for e in base}
    images, meta = [], []
    for e in sorted(emoji, key=lambda e: e["sort_order"]):
        info = by_hex.get(e["unified"].replace("-FE0F", ""), {})
        label = info.get("label") or e["name"].lower()
        for style, (package, key) in STYLES.items():
            if not e.get(f"has_img_{key}"):
                continue
            images.append(load_rgb(MODULES / package / "img" / key / "64" / e["image"]))
            meta.append({
                "unified": e["unified"], "style": style, "label": label.lower(),
                "short_names": e["short_names"], "tags": info.get("tags", []),
                "category": e["category"], "subcategory": e["subcategory"],
                "split": "heldout" if heldout(e["unified"]) else "train",
            })
    work.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(work / "emoji64.npz", images=np.stack(images))
    (work / "emoji64.json").write_text(json.dumps(meta, indent=0))
    n_held = sum(m["split"] == "heldout" for m in meta)
    print(f"data: {len(meta)} images ({len(meta) - n_held} train, {n_held} held out) -> {work}")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/builtin-train"))
