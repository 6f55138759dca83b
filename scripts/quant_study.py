#!/usr/bin/env python3
"""How much image a UNet weight quantisation keeps, measured in diffusers (issue 21's study).

Quantises and dequantises the UNet's Linear / Conv2d weights in numpy exactly as src/gpu/dtype.rs
stores them (rows = first dimension, blocks of 32 along the rest, f16 scales and minimums), runs
the same generations as `ldm bench quality` (2 prompts x 3 seeds, 12 steps, guidance 5 by default)
and prints the PSNR of each 8-bit image against the f32 model's. Sections:

  formats     every block format everywhere (round to nearest)
  groups      q4_1 in one block group at a time, f32 elsewhere (where the error comes from)
  kept        q4_1 everywhere except one kind of layer kept in f32 (what keeping layers buys)
  gptq        Hessian-aware rounding (GPTQ, Frantar et al. 2022) with blocks of 32 as the groups,
              from the inputs of every Linear / Conv2d over calibration prompts (both CFG halves,
              all timesteps)

Usage: /var/tmp/torchvenv/bin/python scripts/quant_study.py [--model DIR] [--sections formats,gptq]
The numbers in the README's quantisation section came from this script on the built-in model.
"""
import argparse
import json
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

BITS = {"f32": 32.0, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0}
CALIBRATION = ["red apple, noto", "grinning cat, twemoji", "pizza, noto", "rocket, twemoji",
               "dog face, twemoji", "birthday cake, noto", "ghost, twemoji", "fire, twemoji"]
KINDS = {
    "attn1.to_q/k": r"attn1\.to_[qk]\.", "attn1.to_v/out": r"attn1\.(to_v|to_out)", "attn2.to_q": r"attn2\.to_q\.",
    "attn2.to_k/v": r"attn2\.to_[kv]\.", "attn2.to_out": r"attn2\.to_out", "ff": r"\.ff\.", "proj_in/out": r"proj_(in|out)",
    "resnet conv1": r"conv1\.", "resnet conv2": r"conv2\.", "shortcut/samplers": r"conv_shortcut|samplers",
    "time (emb, proj)": r"time_emb", "conv_in/out": r"^conv_(in|out)\.",
}


def f16(x):
    return x.astype(np.float16).astype(np.float32)


def blocks(w):
    """[rows, K] in blocks of 32 along K (zero padded), as dtype.rs lays them out."""
    r = w.shape[0]
    x = w.reshape(r, -1)
    k = x.shape[1]
    return np.pad(x, ((0, 0), (0, (-k) % 32))).reshape(r, -1, 32), k


def rtn(w, fmt):
    """Round to nearest in `fmt`, as dtype.rs's encoders do, dequantised."""
    if fmt == "f32":
        return w
    x, k = blocks(w.astype(np.float32))
    if fmt == "q8_0":
        d = f16(np.abs(x).max(-1, keepdims=True) / 127)
        y = np.clip(np.round(x / np.where(d == 0, 1, d)), -127, 127) * d
    elif fmt in ("q4_0", "q5_0"):
        n = 8 if fmt == "q4_0" else 16
        mx = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)
        d = f16(mx / -n)
        y = (np.clip(np.round(x / np.where(d == 0, 1, d) + n), 0, 2 * n - 1) - n) * d
    else:
        top = 15 if fmt == "q4_1" else 31
        lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        d, m = f16((hi - lo) / top), f16(lo)
        y = np.clip(np.round((x - m) / np.where(d == 0, 1, d)), 0, top) * d + m
    return y.reshape(w.shape[0], -1)[:, :k].reshape(w.shape)


def gptq(w, hessian, top, damp=0.01):
    """GPTQ with asymmetric `top`+1-level blocks of 32: each block's scale and minimum from the
    (already error-corrected) weights when the sweep reaches it, in f16 as stored."""
    w = w.reshape(w.shape[0], -1).double().clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % 32 == 0:
            lo, hi = w[:, i:i + 32].min(1, keepdim=True).values, w[:, i:i + 32].max(1, keepdim=True).values
            d, m = ((hi - lo) / top).half().double(), lo.half().double()
            safe = torch.where(d == 0, torch.ones_like(d), d)
        q[:, i:i + 1] = torch.clamp(torch.round((w[:, i:i + 1] - m) / safe), 0, top) * d + m
        err = (w[:, i:i + 1] - q[:, i:i + 1]) / u[i, i]
        w[:, i + 1:] -= err @ u[i:i + 1, i + 1:]
    return q


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="assets/builtin/emoji")
    ap.add_argument("--prompt", action="append", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--sections", default="formats,groups,kept,gptq")
    a = ap.parse_args()
    prompts = a.prompt or ["an astronaut riding a horse", "a red apple on a table"]
    seeds = [int(s) for s in a.seeds.split(",")]
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    orig = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    layers = {n + ".weight": m for n, m in unet.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight[0].numel() >= 32}
    total = sum(orig[k].numel() for k in layers)

    def generate():
        out = []
        for p in prompts:
            for s in seeds:
                im = pipe(p, num_inference_steps=a.steps, guidance_scale=a.guidance,
                          generator=torch.Generator().manual_seed(s), output_type="np").images[0]
                out.append(np.round(im * 255).astype(np.float64))
        return out

    reference = generate()
    results = []

    def measure(label, weights, bits):
        unet.load_state_dict({**orig, **weights})
        psnr = [10 * np.log10(255 ** 2 / max(((x - r) ** 2).mean(), 1e-12)) for x, r in zip(generate(), reference)]
        row = {"label": label, "bits_per_weight": round(bits, 2), "mean_psnr_db": round(float(np.mean(psnr)), 2),
               "min_psnr_db": round(float(np.min(psnr)), 2), "psnr_db": [round(float(p), 1) for p in psnr]}
        print(json.dumps(row), flush=True)
        results.append(row)

    def policy(label, choose):
        weights, bits = {}, 0.0
        for k in layers:
            fmt = choose(k)
            weights[k] = torch.from_numpy(rtn(orig[k].numpy(), fmt))
            bits += BITS[fmt] * orig[k].numel()
        measure(label, weights, bits / total)

    sections = a.sections.split(",")
    if "formats" in sections:
        for fmt in ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]:
            policy(fmt, lambda k, fmt=fmt: fmt)
    if "groups" in sections:
        group = lambda k: (re.match(r"((down|up)_blocks\.\d+\.\w+|mid_block\.\w+|conv_in|conv_out|time_embedding)", k) or [k])[0]
        for g in dict.fromkeys(group(k) for k in layers):
            share = sum(orig[k].numel() for k in layers if group(k) == g) / total
            policy(f"q4_1 in {g} only ({100 * share:.1f}% of weights)", lambda k, g=g: "q4_1" if group(k) == g else "f32")
    if "kept" in sections:
        for kind, pattern in KINDS.items():
            share = sum(orig[k].numel() for k in layers if re.search(pattern, k)) / total
            policy(f"q4_1, {kind} kept f32 ({100 * share:.1f}%)", lambda k, p=pattern: "f32" if re.search(p, k) else "q4_1")
    if "gptq" in sections:
        hessians = {}

        def hook(name):
            def record(mod, inputs):
                x = inputs[0].detach().double()
                if isinstance(mod, nn.Conv2d):
                    x = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
                    x = x.transpose(1, 2).reshape(-1, x.shape[1])
                else:
                    x = x.reshape(-1, x.shape[-1])
                hessians[name] = hessians.get(name, 0) + x.T @ x
            return record

        unet.load_state_dict(orig)  # calibrate on the f32 model's own activations
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
        t = time.time()
        for p in CALIBRATION:
            pipe(p, num_inference_steps=a.steps, guidance_scale=a.guidance, generator=torch.Generator().manual_seed(100), output_type="np")
        for h in handles:
            h.remove()
        print(json.dumps({"calibration_s": round(time.time() - t, 1), "prompts": len(CALIBRATION)}), flush=True)
        for fmt, top in [("q4_1", 15), ("q5_1", 31)]:
            weights = {k: gptq(orig[k], hessians[k], top).reshape(orig[k].shape).float() for k in layers}
            measure(f"gptq {fmt}", weights, BITS[fmt])
            # Output SNR per layer on the calibration inputs, GPTQ against round to nearest.
            def out_snr(k, wq):
                w = orig[k].reshape(orig[k].shape[0], -1).double()
                e = wq.reshape(w.shape).double() - w
                return 10 * np.log10((torch.trace(w @ hessians[k] @ w.T) / torch.trace(e @ hessians[k] @ e.T)).item())
            med = lambda v: float(np.median(v))
            print(json.dumps({"format": fmt, "median_layer_output_snr_db": {
                "round_to_nearest": round(med([out_snr(k, torch.from_numpy(rtn(orig[k].numpy(), fmt))) for k in layers]), 1),
                "gptq": round(med([out_snr(k, weights[k]) for k in layers]), 1)}}), flush=True)
    unet.load_state_dict(orig)


if __name__ == "__main__":
    main()
