#!/usr/bin/env python3
"""The judge of the built-in model's quality: a small CNN trained on the real emoji images (train
split) to tell their top-level category (10) and subcategory (99), then used by evaluate.py on
generated images. Its accuracy on the held-out real images is reported beside the generated
ones', as the ceiling the generator is measured against.

Writes WORK/classifier.pt (weights_only) and WORK/classifier.json (label lists, accuracies).
"""

import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import WORK, load_data, threads, to_tensor


class EmojiClassifier(nn.Module):
    def __init__(self, n_cat, n_sub):
        super().__init__()
        layers, c = [], 3
        for w in (32, 64, 128, 256):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(True), nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(0.3)
        self.cat = nn.Linear(c, n_cat)
        self.sub = nn.Linear(c, n_sub)

    def forward(self, x):
        h = self.drop(self.features(x).mean(dim=(2, 3)))
        return self.cat(h), self.sub(h)


def labels(meta):
    cats = sorted({m["category"] for m in meta})
    subs = sorted({m["subcategory"] for m in meta})
    return cats, subs


def load_classifier():
    info = json.loads((WORK / "classifier.json").read_text())
    model = EmojiClassifier(len(info["categories"]), len(info["subcategories"]))
    model.load_state_dict(torch.load(WORK / "classifier.pt", weights_only=True))
    return model.eval(), info


@torch.no_grad()
def predict(model, x, batch=256):
    """(category ids, subcategory ids) of images in [-1, 1]."""
    cats, subs = [], []
    for i in range(0, len(x), batch):
        c, s = model(x[i:i + batch])
        cats.append(c.argmax(1))
        subs.append(s.argmax(1))
    return torch.cat(cats), torch.cat(subs)


def augment(x):
    """Random shifts of up to 4 pixels (white border) and mirror images."""
    x = F.pad(x, (4, 4, 4, 4), value=1.0)
    i, j = torch.randint(0, 9, (2,)).tolist()
    x = x[:, :, i:i + 64, j:j + 64]
    flip = torch.rand(len(x)) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def main():
    threads()
    torch.manual_seed(0)
    images, meta = load_data()
    cats, subs = labels(meta)
    x = to_tensor(images)
    yc = torch.tensor([cats.index(m["category"]) for m in meta])
    ys = torch.tensor([subs.index(m["subcategory"]) for m in meta])
    tr = torch.tensor([m["split"] == "train" for m in meta])
    model = EmojiClassifier(len(cats), len(subs))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    epochs, batch = int(os.environ.get("LDM_CLASSIFIER_EPOCHS", "30")), 128
    xt, yct, yst = x[tr], yc[tr], ys[tr]
    steps = epochs * (len(xt) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for k in range(len(xt) // batch):
            idx = perm[k * batch:(k + 1) * batch]
            c, s = model(augment(xt[idx]))
            loss = F.cross_entropy(c, yct[idx]) + F.cross_entropy(s, yst[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    pc, ps = predict(model, x[~tr])
    held_cat = (pc == yc[~tr]).float().mean().item()
    held_sub = (ps == ys[~tr]).float().mean().item()
    pc, ps = predict(model, xt)
    train_cat = (pc == yct).float().mean().item()
    torch.save(model.state_dict(), WORK / "classifier.pt")
    info = {"categories": cats, "subcategories": subs, "heldout_category_acc": round(held_cat, 4), "heldout_subcategory_acc": round(held_sub, 4),
            "train_category_acc": round(train_cat, 4), "heldout_images": int((~tr).sum()), "epochs": epochs, "seconds": round(time.time() - t0)}
    (WORK / "classifier.json").write_text(json.dumps(info, indent=1))
    print(f"classifier: held-out real images {held_cat:.1%} category, {held_sub:.1%} subcategory (train {train_cat:.1%})")


if __name__ == "__main__":
    main()
