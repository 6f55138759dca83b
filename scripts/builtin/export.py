#!/usr/bin/env python3
"""Writes the built-in model: a diffusers StableDiffusionPipeline folder in fp16 at
assets/builtin/emoji/ (text encoder, tokenizer, UNet: the EMA weights of stage 2; VAE: stage 1),
with the default scheduler the evaluation chose. The model card (README.md there) is written by
evaluate.py, which measures what it reports.
"""

import argparse
import json
import shutil

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from common import MODEL_DIR, WORK, load_checkpoint
from train_unet import SCHEDULE, UNET_CONFIG, text_encoder


def scheduler():
    # DPM-Solver++ (2M) on the training schedule: good images in 20 steps.
    return DPMSolverMultistepScheduler(**SCHEDULE, steps_offset=1, timestep_spacing="leading", algorithm_type="dpmsolver++", solver_order=2)


def build_pipeline():
    tok = CLIPTokenizer.from_pretrained(str(WORK / "tokenizer"))
    ck = load_checkpoint(WORK / "unet.pt")
    if ck is None:
        raise SystemExit(f"no stage 2 checkpoint in {WORK}: run train_unet.py first")
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict(ck["ema_unet"])
    te = text_encoder(tok)
    te.load_state_dict(ck["ema_te"])
    vae = AutoencoderKL.from_pretrained(str(WORK / "vae"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(torch.float32), ck["step"]


def main():
    argparse.ArgumentParser(description=__doc__).parse_args()
    pipe, step = build_pipeline()
    card = MODEL_DIR / "README.md"
    kept = card.read_text() if card.exists() else None
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    pipe.to(torch.float16).save_pretrained(str(MODEL_DIR), safe_serialization=True)
    if kept is not None:
        card.write_text(kept)
    (MODEL_DIR / "training.json").write_text(json.dumps({"stage2_step": step}, indent=1) + "\n")
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    print(f"export: {MODEL_DIR} ({total / 1e6:.2f} MB) from stage 2 step {step}")


if __name__ == "__main__":
    main()
