"""Training fixtures for src/training: a tiny concatenation-conditioned `UNet2DModel` trained by
torch + diffusers, for the engine to repeat from the same start.

tests/fixtures/training/:
  unet/config.json, unet/diffusion_pytorch_model.safetensors  the initial weights (save_pretrained)
  run.json  one batch (epsilon objective) and its loss, and a 50-step run (v objective, AdamW,
            clipping at norm 1, EMA 0.99, condition dropout by a fixed mask): per step the batch's
            items, timesteps and kept conditions, then torch's loss and gradient norm
  run.safetensors  the data (`x0`, `cond`: latents and condition channels of 6 pairs), the batch's
            gradient of every parameter (`grad.NAME`), the final trained and EMA weights of a few
            tensors (`final.NAME`, `final_ema.NAME`)
Noise of step s is torch.randn(shape, generator=torch.Generator().manual_seed(1000 + s)).
"""
import json
import os

import torch
from safetensors.torch import save_file
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "training")
LATENT, COND, SIDE, PAIRS, BATCH, STEPS = 3, 3, 8, 6, 2, 50
LR, WEIGHT_DECAY, MAX_NORM, EMA_DECAY = 2e-3, 1e-2, 1.0, 0.99
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
# Tensors whose final values are compared in full (one per kind of layer).
WATCH = ["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.1.attentions.0.to_q.weight",
         "mid_block.attentions.0.to_out.0.bias", "up_blocks.0.resnets.1.conv_shortcut.weight", "conv_out.bias",
         "conv_norm_out.weight"]


def model_input(sched, x0, cond, t, noise, keep, objective):
    noisy = sched.add_noise(x0, noise, t)
    cond = cond * keep.view(-1, 1, 1, 1).to(cond.dtype)
    target = noise if objective == "epsilon" else sched.get_velocity(x0, noise, t)
    return torch.cat([noisy, cond], 1), target


def main():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=SIDE, in_channels=LATENT + COND, out_channels=LATENT, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
    )
    os.makedirs(OUT, exist_ok=True)
    unet.save_pretrained(os.path.join(OUT, "unet"))
    sched = DDPMScheduler(**SCHEDULE)
    x0 = torch.randn(PAIRS, LATENT, SIDE, SIDE)
    cond = torch.randn(PAIRS, COND, SIDE, SIDE)

    # One batch: the loss and every gradient.
    items = torch.tensor([1, 4])
    t = torch.tensor([17, 803])
    noise = torch.randn(BATCH, LATENT, SIDE, SIDE, generator=torch.Generator().manual_seed(999))
    keep = torch.tensor([True, False])
    inp, target = model_input(sched, x0[items], cond[items], t, noise, keep, "epsilon")
    loss = torch.nn.functional.mse_loss(unet(inp, t).sample, target)
    loss.backward()
    gradients = {
        "items": items.tolist(), "timesteps": t.tolist(), "noise_seed": 999, "keep_cond": keep.tolist(),
        "loss": float(loss.detach()),
    }
    tensors = {f"grad.{n}": p.grad.detach().clone() for n, p in unet.named_parameters()}
    unet.zero_grad()

    # 50 steps of training.
    opt = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    ema = EMAModel(unet.parameters(), decay=EMA_DECAY)
    g = torch.Generator().manual_seed(5)
    steps = []
    for s in range(STEPS):
        items = torch.randint(0, PAIRS, (BATCH,), generator=g)
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        keep = torch.rand(BATCH, generator=g) >= 0.25
        noise = torch.randn(BATCH, LATENT, SIDE, SIDE, generator=torch.Generator().manual_seed(1000 + s))
        inp, target = model_input(sched, x0[items], cond[items], t, noise, keep, "v_prediction")
        loss = torch.nn.functional.mse_loss(unet(inp, t).sample, target)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_NORM)
        opt.step()
        ema.step(unet.parameters())
        steps.append({"items": items.tolist(), "timesteps": t.tolist(), "keep_cond": keep.tolist(),
                      "loss": float(loss.detach()), "grad_norm": float(norm)})
    params = dict(unet.named_parameters())
    ema_params = dict(zip([n for n, _ in unet.named_parameters()], ema.shadow_params))
    run = {
        "lr": LR, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_NORM, "ema_decay": EMA_DECAY, "schedule": SCHEDULE,
        "latent": LATENT, "cond": COND, "side": SIDE, "pairs": PAIRS, "gradients": gradients, "steps": steps,
    }
    tensors.update({"x0": x0, "cond": cond})
    tensors.update({f"final.{n}": params[n].detach().clone() for n in WATCH})
    tensors.update({f"final_ema.{n}": ema_params[n].detach().clone() for n in WATCH})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "run.safetensors"))
    with open(os.path.join(OUT, "run.json"), "w") as f:
        json.dump(run, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
