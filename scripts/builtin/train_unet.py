#!/usr/bin/env python3
"""Stage 2 of the built-in model: a text-conditional UNet2DConditionModel in the autoencoder's
latent space (16x16x4) and a small CLIP-architecture text encoder trained jointly with it, as the
latent diffusion paper trains its domain encoder tau_theta with the denoiser (section 3.3).

- Captions: random_caption() of common.py (label, sometimes short name, tags, category, style).
  10% are dropped to "" so the model also learns the unconditional prediction that
  classifier-free guidance needs.
- Tokenizer: CLIP's BPE format, fitted to the caption corpus (WORK/tokenizer, 2560 tokens, 32 long).
- Objective: epsilon prediction on Stable Diffusion's scaled-linear schedule (1000 steps), with
  min-SNR-5 loss weights (Hang et al. 2023), which converge faster at this scale.
- Latents: the autoencoder's posterior mean and std of every training image, computed once; each
  step draws a fresh latent sample from them.
- EMA of all trained weights (decay 0.999); the EMA weights are what export.py ships.

Resumable: WORK/unet.pt every --save-every steps (weights, EMA, optimiser, RNG, step).
Every --preview-every steps a grid of samples goes to WORK/previews/.
"""

import argparse
import copy
import json
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common import WORK, caption_corpus, fit_bpe, load_checkpoint, load_data, random_caption, save_checkpoint, threads, to_tensor, write_tokenizer

VOCAB = 2560
MAX_LENGTH = 32
TEXT_DIM = 256

UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 160),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=32,
)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")
PREVIEW_PROMPTS = ["red apple, noto", "smiling face with sunglasses, twemoji", "flag: japan, noto", "dog face, twemoji",
                   "pizza, noto", "rocket, twemoji", "red heart, noto", "grinning face, noto"]


def tokenizer(work):
    folder = work / "tokenizer"
    if not (folder / "vocab.json").exists():
        _, meta = load_data()
        vocab, merges = fit_bpe(caption_corpus(meta), VOCAB)
        write_tokenizer(folder, vocab, merges, MAX_LENGTH)
        print(f"tokenizer: {len(vocab)} tokens fitted to the captions")
    return CLIPTokenizer.from_pretrained(str(folder))


def text_encoder(tok):
    cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", projection_dim=TEXT_DIM,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(cfg)


def encode_latents(work, images, meta):
    """Posterior mean and std of every training image (scaled by the VAE's scaling factor)."""
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    vae = AutoencoderKL.from_pretrained(str(work / "vae")).eval()
    train = [i for i, m in enumerate(meta) if m["split"] == "train"]
    x = to_tensor(images[train])
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(x), 128):
            d = vae.encode(x[i:i + 128]).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    s = vae.config.scaling_factor
    out = {"mean": torch.cat(means) * s, "std": torch.cat(stds) * s, "index": torch.tensor(train)}
    torch.save(out, path)
    return out


def min_snr_weights(alphas_cumprod, t, gamma=5.0):
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def preview(work, step, unet, te, tok, vae, steps=25, guidance=5.0):
    sched = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    ids = tok(PREVIEW_PROMPTS + [""] * len(PREVIEW_PROMPTS), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    ctx = te(ids)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(PREVIEW_PROMPTS), 4, 16, 16, generator=g)
    for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
        cond, unc = eps.chunk(2)
        x = sched.step(unc + guidance * (cond - unc), t, x).prev_sample
    img = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)
    img = ((img + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    grid = np.concatenate(list(img), axis=1)
    (work / "previews").mkdir(exist_ok=True)
    Image.fromarray(grid).save(work / "previews" / f"step{step:06d}.png")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--preview-every", type=int, default=2000)
    a = p.parse_args()
    threads()
    torch.manual_seed(0)
    images, meta = load_data()
    tok = tokenizer(WORK)
    lat = encode_latents(WORK, images, meta)
    train_meta = [meta[i] for i in lat["index"].tolist()]

    unet = UNet2DConditionModel(**UNET_CONFIG)
    te = text_encoder(tok)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    for m in (ema_unet, ema_te):
        m.requires_grad_(False)
    sched = DDPMScheduler(**SCHEDULE)
    ac = sched.alphas_cumprod
    rng = random.Random(0)
    step, log = 0, []
    ckpt_path = WORK / "unet.pt"
    if (ck := load_checkpoint(ckpt_path)) is not None:
        unet.load_state_dict(ck["unet"]); te.load_state_dict(ck["te"])
        ema_unet.load_state_dict(ck["ema_unet"]); ema_te.load_state_dict(ck["ema_te"])
        opt.load_state_dict(ck["opt"])
        step, log = ck["step"], ck["log"]
        torch.set_rng_state(ck["rng"])
        rng.setstate(ck["py_rng"])
        print(f"resumed at step {step}")
    n_unet = sum(p.numel() for p in unet.parameters())
    n_te = sum(p.numel() for p in te.parameters())
    print(f"unet {n_unet / 1e6:.2f} M, text encoder {n_te / 1e6:.2f} M parameters; {len(train_meta)} training images")
    vae = AutoencoderKL.from_pretrained(str(WORK / "vae")).eval()

    t0, seen, losses = time.time(), 0, []
    while step < a.steps:
        unet.train(); te.train()
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(train_meta), (a.batch,))
        z0 = lat["mean"][idx] + lat["std"][idx] * torch.randn(a.batch, 4, 16, 16)
        caps = ["" if rng.random() < a.drop else random_caption(train_meta[i], rng) for i in idx.tolist()]
        ids = tok(caps, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (a.batch,))
        zt = sched.add_noise(z0, noise, t)
        eps = unet(zt, t, encoder_hidden_states=te(ids)[0]).sample
        w = min_snr_weights(ac, t)
        loss = (w * F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(a.ema, (1 + step) / (10 + step))
            for ema, live in ((ema_unet, unet), (ema_te, te)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        step += 1
        seen += a.batch
        losses.append(loss.item())
        if step % 50 == 0:
            entry = {"step": step, "loss": round(sum(losses) / len(losses), 5), "lr": round(lr, 7), "samples_per_s": round(seen / (time.time() - t0), 1), "time": round(time.time())}
            losses = []
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if step % a.save_every == 0 or step == a.steps:
            save_checkpoint(ckpt_path, unet=unet.state_dict(), te=te.state_dict(), ema_unet=ema_unet.state_dict(), ema_te=ema_te.state_dict(),
                            opt=opt.state_dict(), step=step, log=log, rng=torch.get_rng_state(), py_rng=rng.getstate())
        if step % a.preview_every == 0 or step == a.steps:
            preview(WORK, step, ema_unet, ema_te, tok, vae)
    (WORK / "unet.json").write_text(json.dumps({"unet_params": n_unet, "text_encoder_params": n_te, "steps": step, "batch": a.batch, "log": log}, indent=1))
    print("stage 2 done")


if __name__ == "__main__":
    main()
