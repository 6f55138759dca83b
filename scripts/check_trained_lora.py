"""Loads a LoRA written by `ldm train-lora` with diffusers' `load_lora_weights` and generates with
it (a manual check that the file is what diffusers reads): `check_trained_lora.py MODEL LORA_DIR
PROMPT OURS.png [STEPS SIDE]`, where OURS.png is `ldm generate --model MODEL --lora
LORA_DIR/pytorch_lora_weights.safetensors --prompt PROMPT --seed 0` with the same steps and size.
Prints how many layers got adapters and the largest pixel difference to OURS.png."""
import sys

import numpy as np
import torch
from PIL import Image
from diffusers import StableDiffusionPipeline

model, lora, prompt, ours = sys.argv[1:5]
steps, side = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (25, 512)
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
pipe.load_lora_weights(lora)
wrapped = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A"))
img = pipe(prompt, num_inference_steps=steps, height=side, width=side, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
theirs = (img * 255).round()
mine = np.asarray(Image.open(ours).convert("RGB")).astype(np.float64)
print(f"{wrapped} layers with adapters; max |ldm - diffusers| = {np.abs(mine - theirs).max():.0f}, mean {np.abs(mine - theirs).mean():.3f} (of 255)")
