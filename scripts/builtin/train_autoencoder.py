#!/usr/bin/env python3
"""Stage 1 of the built-in model: a KL-regularised autoencoder, f=4 (64x64x3 images to 16x16x4
latents), trained as in the latent diffusion paper (Rombach et al. 2022, section 3.1 and appendix
G): pixel reconstruction loss, a tiny KL weight, and a patch-based adversarial loss (PatchGAN
discriminator, hinge loss, adaptive weight from the decoder's last layer) switched on part-way.
No perceptual (LPIPS) loss: its VGG weights cannot be downloaded here.

Resumable: WORK/autoencoder.pt is written every --save-every steps; running again continues.
At the end: held-out PSNR, the latent scaling factor (1 / std of the training latents) and the
diffusers folder WORK/vae (float32; export.py writes the shipped fp16 copy).
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL

from common import WORK, load_checkpoint, load_data, save_checkpoint, threads, to_tensor

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16,
)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as taming-transformers' NLayerDiscriminator: each output
    logit judges one overlapping patch of the image."""

    def __init__(self, ch=32, layers=3):
        super().__init__()
        seq = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ch
        for i in range(1, layers):
            seq += [nn.Conv2d(c, c * 2, 4, 2 if i < layers - 1 else 1, 1, bias=False), nn.BatchNorm2d(c * 2), nn.LeakyReLU(0.2, True)]
            c *= 2
        seq += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*seq)

    def forward(self, x):
        return self.net(x)


def psnr(a, b):
    """PSNR in dB of images in [-1, 1], on the 8-bit scale [0, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4800)
    p.add_argument("--full-from", type=int, default=4400, help="random 32x32 crops before this step (4x cheaper), whole images after")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--disc-start", type=int, default=2500)
    p.add_argument("--disc-weight", type=float, default=0.5)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--save-every", type=int, default=250)
    a = p.parse_args()
    threads()
    torch.manual_seed(0)
    images, meta = load_data()
    x_all = to_tensor(images)
    train = x_all[[i for i, m in enumerate(meta) if m["split"] == "train"]]
    held = x_all[[i for i, m in enumerate(meta) if m["split"] == "heldout"]]

    vae = AutoencoderKL(**VAE_CONFIG)
    disc = PatchDiscriminator()
    opt = torch.optim.Adam(vae.parameters(), lr=a.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=a.lr, betas=(0.5, 0.9))
    ckpt_path = WORK / "autoencoder.pt"
    step, log = 0, []
    if (ck := load_checkpoint(ckpt_path)) is not None:
        vae.load_state_dict(ck["vae"]); disc.load_state_dict(ck["disc"])
        opt.load_state_dict(ck["opt"]); opt_d.load_state_dict(ck["opt_d"])
        step, log = ck["step"], ck["log"]
        torch.set_rng_state(ck["rng"])
        print(f"resumed at step {step}")
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"autoencoder: {n_params / 1e6:.2f} M parameters, {len(train)} train / {len(held)} held-out images")

    last_layer = vae.decoder.conv_out.weight
    t0, seen = time.time(), 0
    while step < a.steps:
        vae.train(); disc.train()
        idx = torch.randint(0, len(train), (a.batch,))
        x = train[idx]
        # The autoencoder is convolutional: crops teach it the same maps at a quarter of the
        # cost, and mirrored images are as good a reconstruction target as the originals.
        if step < a.full_from:
            i, j = torch.randint(0, 33, (2,)).tolist()
            x = x[:, :, i:i + 32, j:j + 32]
        flip = torch.rand(a.batch) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        # Cosine decay to 10% keeps the late, adversarial phase stable.
        lr = a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups + opt_d.param_groups:
            g["lr"] = lr
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        nll = (x - rec).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        loss = nll + a.kl_weight * kl
        adv = step >= a.disc_start
        g_loss = torch.zeros(())
        if adv:
            g_loss = -disc(rec).mean()
            g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
            g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
            weight = (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach() * a.disc_weight
            loss = loss + weight * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        d_loss = torch.zeros(())
        if adv:
            real, fake = disc(x), disc(rec.detach())
            d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        step += 1
        seen += a.batch
        if step % 50 == 0:
            rate = seen / (time.time() - t0)
            entry = {"step": step, "l1": round(nll.item(), 5), "kl": round(kl.item(), 3), "g": round(g_loss.item(), 4), "d": round(d_loss.item(), 4), "img_per_s": round(rate, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if step % a.save_every == 0 or step == a.steps:
            save_checkpoint(ckpt_path, vae=vae.state_dict(), disc=disc.state_dict(), opt=opt.state_dict(), opt_d=opt_d.state_dict(), step=step, log=log, rng=torch.get_rng_state())

    vae.eval()
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(held[i:i + 64]).latent_dist.mode()).sample for i in range(0, len(held), 64)])
        held_psnr = psnr(rec, held)
        rec_t = torch.cat([vae.decode(vae.encode(train[i:i + 64]).latent_dist.mode()).sample for i in range(0, 512, 64)])
        train_psnr = psnr(rec_t, train[:512])
        z = torch.cat([vae.encode(train[i:i + 128]).latent_dist.sample() for i in range(0, len(train), 128)])
    scaling = 1.0 / z.flatten().std().item()
    vae.register_to_config(scaling_factor=round(scaling, 5))
    vae.save_pretrained(str(WORK / "vae"), safe_serialization=True)
    report = {"params": n_params, "steps": step, "heldout_psnr_db": round(held_psnr, 2), "train_psnr_db": round(train_psnr, 2),
              "heldout_images": len(held), "scaling_factor": round(scaling, 5), "log": log}
    (WORK / "autoencoder.json").write_text(json.dumps(report, indent=1))
    print(f"autoencoder: held-out PSNR {held_psnr:.2f} dB (train {train_psnr:.2f} dB), scaling factor {scaling:.5f}")


if __name__ == "__main__":
    main()
