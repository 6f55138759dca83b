"""Loads a folder written by `ldm train` with diffusers and runs its UNet once (a manual check that
the saved weights are diffusers' layout): `check_trained.py DIR`. Prints the classes loaded, the
parameter count and the UNet output's statistics for a fixed input, which `ldm` reproduces with
the same folder (tests/cli.rs compares the layout; this compares numbers when run by hand)."""
import json
import sys

import torch
from diffusers import DiffusionPipeline, UNet2DModel

folder = sys.argv[1]
pipe = DiffusionPipeline.from_pretrained(folder)
print(type(pipe).__name__, {k: type(v).__name__ for k, v in pipe.components.items()})
unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
cfg = unet.config
g = torch.Generator().manual_seed(0)
x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
with torch.no_grad():
    y = unet(x, 500).sample
print(json.dumps({"parameters": sum(p.numel() for p in unet.parameters()), "mean": float(y.mean()), "std": float(y.std()), "first": [float(v) for v in y.reshape(-1)[:4]]}))
