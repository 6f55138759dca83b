"""LoRA training fixtures for src/training: the tiny SD 1.x UNet of tests/fixtures/sd1 with a PEFT
LoRA on its attention projections (as diffusers' train_text_to_image_lora.py adds it), trained by
torch, for the engine to repeat from the same start.

tests/fixtures/lora-training/:
  run.json  the LoRA settings, one batch (its items, timesteps, kept captions, loss) and a 20-step run
            (AdamW, clipping at norm 1, epsilon objective, caption dropout by a fixed mask): per step
            the items, timesteps and kept captions, then torch's loss and gradient norm
  run.safetensors  the data (`x0`: latents of 4 images, `context`: their text embeddings, `uncond`:
            the empty caption's), the LoRA's starting values (`init.NAME`), the batch's gradient of
            every LoRA tensor (`grad.NAME`); NAME is PEFT's (`...to_q.lora_A.weight`)
  pytorch_lora_weights.safetensors  the trained LoRA as the training script saves it
            (`StableDiffusionPipeline.save_lora_weights`, diffusers key names, PEFT metadata)
Noise of step s is torch.randn(shape, generator=torch.Generator().manual_seed(1000 + s)).
"""
import json
import os

import torch
from safetensors.torch import save_file
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "lora-training")
RANK, ALPHA, TARGETS = 4, 8, ["to_k", "to_q", "to_v", "to_out.0"]
IMAGES, BATCH, STEPS, TOKENS = 4, 2, 20, 7
LR, WEIGHT_DECAY, MAX_NORM = 5e-3, 1e-2, 1.0


def model_input(sched, x0, context, uncond, t, noise, keep):
    noisy = sched.add_noise(x0, noise, t)
    ctx = torch.where(keep.view(-1, 1, 1), context, uncond.expand_as(context))
    return noisy, ctx


def main():
    # Before add_adapter: PEFT draws the LoRA's A from torch's global generator.
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "sd1", "unet"))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS))
    # Non-zero B (the gaussian init zeroes it, which would make every A gradient zero).
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    names = {n: n.replace(".default", "") for n, p in unet.named_parameters() if p.requires_grad}
    lora = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    sched = DDPMScheduler.from_pretrained(os.path.join(ROOT, "sd1", "scheduler"))
    x0 = torch.randn(IMAGES, 4, 8, 8)
    context = torch.randn(IMAGES, TOKENS, unet.config.cross_attention_dim)
    uncond = torch.randn(1, TOKENS, unet.config.cross_attention_dim)
    tensors = {"x0": x0, "context": context, "uncond": uncond[0]}
    tensors.update({f"init.{names[n]}": p.detach().clone() for n, p in lora.items()})

    items = torch.tensor([1, 3])
    t = torch.tensor([17, 803])
    noise = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(999))
    keep = torch.tensor([True, False])
    noisy, ctx = model_input(sched, x0[items], context[items], uncond, t, noise, keep)
    loss = torch.nn.functional.mse_loss(unet(noisy, t, ctx).sample, noise)
    loss.backward()
    gradients = {"items": items.tolist(), "timesteps": t.tolist(), "noise_seed": 999, "keep_cond": keep.tolist(), "loss": float(loss.detach())}
    tensors.update({f"grad.{names[n]}": p.grad.detach().clone() for n, p in lora.items()})
    unet.zero_grad()

    params = list(lora.values())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    g = torch.Generator().manual_seed(5)
    steps = []
    for s in range(STEPS):
        items = torch.randint(0, IMAGES, (BATCH,), generator=g)
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        keep = torch.rand(BATCH, generator=g) >= 0.25
        noise = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(1000 + s))
        noisy, ctx = model_input(sched, x0[items], context[items], uncond, t, noise, keep)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, ctx).sample, noise)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        steps.append({"items": items.tolist(), "timesteps": t.tolist(), "keep_cond": keep.tolist(), "loss": float(loss.detach()), "grad_norm": float(norm)})

    os.makedirs(OUT, exist_ok=True)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = {"r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS, "init_lora_weights": "gaussian"}
    StableDiffusionPipeline.save_lora_weights(OUT, unet_lora_layers=state, unet_lora_adapter_metadata=metadata, safe_serialization=True)
    run = {
        "rank": RANK, "alpha": ALPHA, "target_modules": TARGETS, "lr": LR, "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_NORM, "images": IMAGES, "tokens": TOKENS, "gradients": gradients, "steps": steps,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "run.safetensors"))
    with open(os.path.join(OUT, "run.json"), "w") as f:
        json.dump(run, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
