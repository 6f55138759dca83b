#!/usr/bin/env python3
"""Measures the built-in model (assets/builtin/emoji, as shipped: fp16 weights run in float32 by
diffusers' StableDiffusionPipeline, the numerical reference of ldm-web) and writes its metrics:

- category / subcategory accuracy of the classifier (classifier.py) on images generated from the
  canonical captions ("<label>, <style>") of 400 training images picked with a fixed seed, at a
  few step counts and guidance scales (the shipped defaults are chosen from these); the same classifier on the real images of those captions and on held-out
  real images, for comparison;
- a confirmation at the chosen defaults on --confirm other training captions (disjoint from the
  sweep's, so the figure is not flattered by having been picked as the best of the sweep);
- stage 1's reconstruction PSNR on held-out images (from train_autoencoder.py);
- a grid of generated samples beside the real images (assets/builtin/samples.png).

Writes WORK/metrics.json; card.py turns it (and the benchmark timings) into the model card.
"""

import argparse
import json
import random
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from classifier import load_classifier, predict
from common import MODEL_DIR, ROOT, WORK, canonical_caption, load_data, threads, to_tensor

# The page's example prompts and the README grid.
SAMPLE_PROMPTS = [
    "red apple, noto", "red apple, twemoji", "smiling face with sunglasses, noto", "grinning cat, twemoji",
    "pizza, noto", "rocket, twemoji", "flag: japan, noto", "dog face, twemoji",
    "red heart, noto", "sun, twemoji", "birthday cake, noto", "ghost, twemoji",
    "alarm clock, noto", "soccer ball, twemoji", "four leaf clover, noto", "fire, twemoji",
]


def generate(pipe, prompts, seeds, steps, guidance, batch=16):
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        img = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
        out.append(torch.from_numpy(img).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(out)


def sweep_captions(train, n):
    """The training images whose captions the sweep uses (a fixed seed)."""
    return sorted(random.Random(1234).sample(train, n))


def captions_and_labels(meta, cats, subs, picked):
    """The captions of images `picked` and their category and subcategory indices."""
    prompts = [canonical_caption(meta[i]) for i in picked]
    yc = torch.tensor([cats.index(meta[i]["category"]) for i in picked])
    ys = torch.tensor([subs.index(meta[i]["subcategory"]) for i in picked])
    return prompts, yc, ys


def accuracy(pc, ps, yc, ys):
    """Top-1 category and subcategory accuracy of predictions against labels."""
    return {"category": (pc == yc).float().mean().item(), "subcategory": (ps == ys).float().mean().item()}


def confirm(pipe, clf, cats, subs, meta, train, swept, n, chosen):
    """Accuracy at the chosen defaults on n training captions not in the sweep (seeds 10000 + index)."""
    pool = sorted(set(train) - set(swept))
    picked = sorted(random.Random(4321).sample(pool, min(n, len(pool))))
    prompts, yc, ys = captions_and_labels(meta, cats, subs, picked)
    pc, ps = predict(clf, generate(pipe, prompts, [10000 + k for k in range(len(picked))], chosen["steps"], chosen["guidance"]))
    r = {"captions": len(picked), "steps": chosen["steps"], "guidance": chosen["guidance"], **accuracy(pc, ps, yc, ys)}
    print(f"confirmation, {r['captions']} other captions at {r['steps']} steps, guidance {r['guidance']}: "
          f"category {r['category']:.1%}, subcategory {r['subcategory']:.1%}", flush=True)
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--steps", type=int, nargs="+", default=[12, 20])
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    p.add_argument("--confirm", type=int, default=768, help="fresh captions for the confirmation at the chosen defaults")
    p.add_argument("--confirm-only", action="store_true", help="keep WORK/metrics.json's sweep; run only the confirmation")
    a = p.parse_args()
    threads()
    images, meta = load_data()
    clf, info = load_classifier()
    cats, subs = info["categories"], info["subcategories"]
    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    train = [i for i, m in enumerate(meta) if m["split"] == "train"]
    if a.confirm_only:
        results = json.loads((WORK / "metrics.json").read_text())
        swept = sweep_captions(train, results["captions"])
        results["confirmation"] = confirm(pipe, clf, cats, subs, meta, train, swept, a.confirm, results["chosen"])
        (WORK / "metrics.json").write_text(json.dumps(results, indent=1))
        return
    picked = sweep_captions(train, a.n)
    prompts, yc, ys = captions_and_labels(meta, cats, subs, picked)
    seeds = list(range(len(picked)))
    real_c, real_s = predict(clf, to_tensor(images[picked]))
    results = {"captions": a.n, "scheduler": type(pipe.scheduler).__name__,
               "real_same_captions": accuracy(real_c, real_s, yc, ys),
               "real_heldout": {"category": info["heldout_category_acc"], "subcategory": info["heldout_subcategory_acc"]},
               "majority_category": max(np.bincount(yc.numpy())) / len(yc), "generated": {}}
    for steps in a.steps:
        for g in a.guidance:
            t0 = time.time()
            x = generate(pipe, prompts, seeds, steps, g)
            secs = (time.time() - t0) / len(prompts)
            pc, ps = predict(clf, x)
            per_cat = {c: round((pc[yc == k] == k).float().mean().item(), 3) for k, c in enumerate(cats) if (yc == k).any()}
            r = {"steps": steps, "guidance": g, **accuracy(pc, ps, yc, ys),
                 "per_category": per_cat, "torch_cpu_seconds_per_image": round(secs, 3)}
            results["generated"][f"{steps}/{g}"] = r
            print(f"{steps} steps, guidance {g}: category {r['category']:.1%}, subcategory {r['subcategory']:.1%} ({secs:.2f} s/image)", flush=True)
    # The shipped defaults: the best guidance, at the fewest steps within 2 points of the best.
    best = max(results["generated"].values(), key=lambda r: r["category"])
    chosen = min((r for r in results["generated"].values() if r["category"] >= best["category"] - 0.02), key=lambda r: (r["steps"], -r["category"]))
    results["chosen"] = {"steps": chosen["steps"], "guidance": chosen["guidance"]}
    results["confirmation"] = confirm(pipe, clf, cats, subs, meta, train, picked, a.confirm, results["chosen"])
    ae = json.loads((WORK / "autoencoder.json").read_text())
    results["autoencoder"] = {k: ae[k] for k in ("heldout_psnr_db", "train_psnr_db", "heldout_images", "scaling_factor", "params")}
    results["eval_prompts"] = [{"prompt": pr, "seed": s} for pr, s in zip(prompts[:8], seeds[:8])]

    # The grid, at the chosen settings: generated above the real image of each prompt.
    g, steps = chosen["guidance"], chosen["steps"]
    gen = generate(pipe, SAMPLE_PROMPTS, list(range(len(SAMPLE_PROMPTS))), steps, g)
    by_caption = {canonical_caption(m): i for i, m in enumerate(meta)}
    real = to_tensor(np.stack([images[by_caption[pr]] if pr in by_caption else np.full((64, 64, 3), 255, np.uint8) for pr in SAMPLE_PROMPTS]))
    rows = []
    for k in range(0, len(SAMPLE_PROMPTS), 8):
        rows += [torch.cat(list(gen[k:k + 8]), dim=2), torch.cat(list(real[k:k + 8]), dim=2)]
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(ROOT / "assets" / "builtin" / "samples.png")
    results["grid"] = {"prompts": SAMPLE_PROMPTS, "guidance": g, "steps": steps, "seeds": "0..15, one per prompt"}
    (WORK / "metrics.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "eval_prompts"}, indent=1))


if __name__ == "__main__":
    main()
