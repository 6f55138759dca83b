#!/usr/bin/env python3
"""Noto -> Twemoji image pairs for `ldm train` (issue 20's demonstration and the training fixtures).

The two emoji sets draw the same emoji, so they are paired by construction: cond/<id>.png is the Noto
Emoji image (Apache-2.0), target/<id>.png the Twemoji one (CC BY 4.0), both 64x64 over white, from
the npm packages `npm ci` installs here (see data.py). Emoji drawn by only one set are left out,
and so are skin-tone variants. The split is data.py's: 5% of the emoji, chosen by a hash of the
code point, are held out.

  pairs.py OUT             writes OUT/train/{cond,target}/ and OUT/heldout/{cond,target}/ and
                           OUT/pairs.json (id, label, category, split per pair)
  pairs.py --fixture OUT   writes 4 training pairs at 32x32 into OUT/{cond,target}/ (the committed
                           fixture tests/fixtures/training/pairs)
"""
import json
import sys
from pathlib import Path

from PIL import Image

from data import MODULES, STYLES, heldout

FIXTURE = ["1F34E", "2600", "1F525", "2764"]  # red apple, sun, fire, red heart


def load(style, image):
    package, key = STYLES[style]
    im = Image.open(MODULES / package / "img" / key / "64" / image).convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, im).convert("RGB")


def main():
    fixture = sys.argv[1] == "--fixture"
    out = Path(sys.argv[-1])
    emoji = json.loads((MODULES / "emoji-datasource-google" / "emoji.json").read_text())
    meta = []
    for e in sorted(emoji, key=lambda e: e["sort_order"]):
        if not (e.get("has_img_google") and e.get("has_img_twitter")):
            continue
        uid = e["unified"]
        if fixture and uid.replace("-FE0F", "") not in FIXTURE:
            continue
        split = "heldout" if heldout(uid) else "train"
        folder = out if fixture else out / split
        for style, sub in (("noto", "cond"), ("twemoji", "target")):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            im = load(style, e["image"])
            if fixture:
                im = im.resize((32, 32), Image.BICUBIC)
            im.save(folder / sub / f"{uid}.png", optimize=True)
        meta.append({"id": uid, "label": e["name"].lower(), "category": e["category"], "subcategory": e["subcategory"], "split": split})
    if not fixture:
        (out / "pairs.json").write_text(json.dumps(meta, indent=0))
    print(f"{len(meta)} pairs -> {out}")


if __name__ == "__main__":
    main()
