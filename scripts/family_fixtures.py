#!/usr/bin/env python3
"""Tiny seeded random-weight models of the wider Stable Diffusion family (SDXL base / refiner / inpainting /
turbo, SD-Turbo, LCM, SDXL ControlNet, TAESD), LoRA and textual-inversion files in the formats people
share, .ckpt and malformed inputs, and diffusers' reference outputs for them.

Run through scripts/fixtures.sh after the other fixture scripts: it reads tests/fixtures/sd1, sd2,
ldm/uncond and images/ (never writes to them). Offline: every model is built from a config with seeded
weights (make_fixtures.reinit). One thread, so re-running reproduces byte-identical files; the script
deletes its own outputs first.

Outputs (see tests/fixtures/README.md, "Model family"):
  tests/fixtures/sdxl/ sdxl-refiner/ sdxl-inpaint/ sdxl-turbo/ sd-turbo/ lcm/   diffusers pipeline folders
  tests/fixtures/controlnet-xl/ taesd/                                         diffusers model folders
  tests/fixtures/sdxl.safetensors, sdxl-refiner.safetensors                    original SGM single files
  tests/fixtures/lora/        kohya and PEFT LoRA files (+ a torch.save .pt copy)
  tests/fixtures/embeddings/  textual inversion (diffusers, A1111 .safetensors / .pt, SDXL clip_l/clip_g pair)
  tests/fixtures/sd1.ckpt     sd1.safetensors' tensors in a torch.save checkpoint
  tests/fixtures/bad/         malformed / unsafe checkpoints (never loaded here)
  tests/fixtures/ref/family_cases.json + family_{index}.safetensors, family_taesd.safetensors,
                     family_prompt_weighting.safetensors, family_q4_check.safetensors
"""

import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (offline env vars, one thread, deterministic algorithms)
import cond_fixtures as cf  # noqa: E402  (traced torch.randn, run_traced, check_image, images)

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    LDMPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.lora_conversion_utils import (  # noqa: E402
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.loaders.single_file_utils import (  # noqa: E402
    create_diffusers_clip_model_from_ldm,
    load_single_file_checkpoint,
)
from peft import LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

import transformers.integrations.peft as _tf_peft  # noqa: E402

# transformers 5.24's PEFT integration (CLIPTextModel.add_adapter / load_adapter, which diffusers'
# load_lora_weights calls for text-encoder LoRAs) demands peft >= 0.22.0, a version not on PyPI (newest:
# 0.21.2, the one diffusers 0.42.1 accepts: >= 0.17.0). Lower transformers' bar to the installed version;
# check_lora() then verifies every loaded text-encoder LoRA tensor and scale exactly.
PEFT_SHIM = None
if _tf_peft.MIN_PEFT_VERSION != peft.__version__ and peft.__version__ == "0.21.2":
    PEFT_SHIM = f"transformers.integrations.peft.MIN_PEFT_VERSION {_tf_peft.MIN_PEFT_VERSION} -> {peft.__version__}"
    _tf_peft.MIN_PEFT_VERSION = peft.__version__

# loading a second adapter into a model: PEFT's (expected) "multiple adapters" notice
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")

FIX = mf.FIX
REF = mf.REF
LORA = FIX / "lora"
EMB = FIX / "embeddings"
BAD = FIX / "bad"
ASTRO = cf.ASTRO
NEG = cf.NEG
W, H = cf.W, cf.H  # 96x64: the image-conditioned cases' size (images/*.png)
CN_SCALE = cf.CN_SCALE

OUTPUT_DIRS = ["sdxl", "sdxl-refiner", "sdxl-inpaint", "sdxl-turbo", "sd-turbo", "lcm", "controlnet-xl", "taesd",
               "lora", "embeddings", "bad"]
OUTPUT_FILES = ["sdxl.safetensors", "sdxl-refiner.safetensors", "sd1.ckpt"]
REF_GLOB = "family_*"

# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

# SDXL base UNet: the real one's structure (DownBlock2D first, 3 levels, transformer depth growing with
# the level, linear projections, text_time added embedding), made tiny. attention_head_dim is really
# the head COUNT in UNet2DConditionModel (diffusers' naming): 4 heads of 4 at 16 channels, 8 of 4 at 32.
XL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16, 32),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    cross_attention_dim=80,  # te1 hidden 32 + te2 hidden 48
    norm_num_groups=4,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 40,  # 6 time ids x 8 + te2 projection_dim 40
)
# SDXL refiner UNet: 4 levels (DownBlock2D, 2x CrossAttn, DownBlock2D), cross-attention on te2 alone,
# 5 time ids (original size, crop, aesthetic score). 4 heads of 6 at 24 channels (head dim 6: not a
# multiple of 4).
REFINER_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(12, 24, 24, 24),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2,
    attention_head_dim=(2, 4, 4, 2),
    use_linear_projection=True,
    cross_attention_dim=48,
    norm_num_groups=4,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=5 * 8 + 40,
)
TE2_HIDDEN, TE2_PROJ = 48, 40
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (the PNDM-era keys included)
XL_SCHED = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    clip_sample=False,
    trained_betas=None,
)
# SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json
LCM_SCHED = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    original_inference_steps=50,
    set_alpha_to_one=True,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_scaling=10.0,
    prediction_type="epsilon",
    clip_sample=False,
    trained_betas=None,
)
TAESD = dict(
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 2, 2, 2),
    num_decoder_blocks=(2, 2, 2, 1),
    latent_channels=4,
    act_fn="relu",
    upsampling_scaling_factor=2,
    latent_magnitude=3,
    latent_shift=0.5,
    scaling_factor=1.0,
    force_upcast=False,
)
SEEDS = dict(te1=500, te2=501, unet=502, vae=503, refiner=510, inpaint=520, lcm=530, controlnet=540, taesd=550,
             lora=560, embeddings=580)


def seeded(seed, build):
    """torch.manual_seed before construction, then make_fixtures.reinit with the same seed."""
    torch.manual_seed(seed)
    m = build()
    mf.reinit(m, seed)
    return m.eval()


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def replace_parts(src, dst, parts):
    """Use `src`'s component folders verbatim in `dst` (byte-identical weight files, so git stores them
    once; sd1's legacy `text_model.` text-encoder layout and the hub-style tokenizer files survive)."""
    for comp in parts:
        if (dst / comp).exists():
            shutil.rmtree(dst / comp)
        shutil.copytree(src / comp, dst / comp)


def te1_config(tok, vocab_size):
    return mf.text_config(range(vocab_size), tok, "quick_gelu")  # ids from the tokenizer: bos 812, eos / pad 813


def te2_config(vocab_size):
    # the real SDXL text_encoder_2 (laion CLIP-ViT-bigG) config carries the legacy ids bos 0 / eos 2 /
    # pad 1: transformers then pools at argmax(input_ids) (the highest id = <|endoftext|> unless added
    # tokens are present), not at the first eos_token_id.
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TE2_HIDDEN, intermediate_size=61, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=TE2_PROJ,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def xl_vae():
    cfg = {k: v for k, v in mf.make_vae().config.items() if k != "_use_default_values"}
    cfg.update(scaling_factor=0.13025, force_upcast=True)
    vae = seeded(SEEDS["vae"], lambda: AutoencoderKL.from_config(cfg))
    with torch.no_grad():  # as make_fixtures: fewer decoded pixels outside [-1, 1]
        vae.decoder.conv_out.weight.mul_(0.5)
    return vae


def build_sdxl():
    tok = CLIPTokenizer.from_pretrained(str(FIX / "sd1" / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(FIX / "sd2" / "tokenizer"))
    assert len(tok) == len(tok2) == 814 and tok.pad_token_id == 813 and tok2.pad_token_id == 0
    te1 = seeded(SEEDS["te1"], lambda: CLIPTextModel(te1_config(tok, len(tok))))
    te2 = seeded(SEEDS["te2"], lambda: CLIPTextModelWithProjection(te2_config(len(tok2))))
    unet = seeded(SEEDS["unet"], lambda: UNet2DConditionModel(**XL_UNET))
    pipe = StableDiffusionXLPipeline(
        vae=xl_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(XL_SCHED), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    folder = FIX / "sdxl"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for dst, src in (("tokenizer", FIX / "sd1" / "tokenizer"), ("tokenizer_2", FIX / "sd2" / "tokenizer")):
        shutil.rmtree(folder / dst)
        shutil.copytree(src, folder / dst)
    return folder


def build_refiner():
    unet = seeded(SEEDS["refiner"], lambda: UNet2DConditionModel(**REFINER_UNET))
    base = FIX / "sdxl"
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=AutoencoderKL.from_pretrained(str(base / "vae")), text_encoder=None, tokenizer=None,
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(base / "text_encoder_2")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(base / "tokenizer_2")), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(XL_SCHED), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )
    folder = FIX / "sdxl-refiner"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    replace_parts(base, folder, ["vae", "text_encoder_2", "tokenizer_2", "scheduler"])
    return folder


def build_sdxl_inpaint():
    base = FIX / "sdxl"
    cfg = dict(XL_UNET, in_channels=9)
    unet = seeded(SEEDS["inpaint"], lambda: UNet2DConditionModel(**cfg))
    p = StableDiffusionXLPipeline.from_pretrained(str(base))
    pipe = StableDiffusionXLInpaintPipeline(
        vae=p.vae, text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2, tokenizer=p.tokenizer,
        tokenizer_2=p.tokenizer_2, unet=unet, scheduler=p.scheduler, requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    folder = FIX / "sdxl-inpaint"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    replace_parts(base, folder, ["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"])
    return folder


def build_turbos():
    """sdxl-turbo: the sdxl components with the Euler ancestral 'trailing' scheduler stabilityai/sdxl-turbo
    ships; sd-turbo: sd2's components likewise (prediction type kept from sd2's config: v_prediction)."""
    base = FIX / "sdxl"
    p = StableDiffusionXLPipeline.from_pretrained(str(base))
    sched = EulerAncestralDiscreteScheduler.from_config(p.scheduler.config, timestep_spacing="trailing")
    StableDiffusionXLPipeline(**{**p.components, "scheduler": sched}, force_zeros_for_empty_prompt=True,
                              add_watermarker=False).save_pretrained(str(FIX / "sdxl-turbo"), safe_serialization=True)
    replace_parts(base, FIX / "sdxl-turbo", ["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet"])

    p2 = StableDiffusionPipeline.from_pretrained(str(FIX / "sd2"))
    sched2 = EulerAncestralDiscreteScheduler.from_config(p2.scheduler.config, timestep_spacing="trailing")
    folder = FIX / "sd-turbo"
    StableDiffusionPipeline(**{**p2.components, "scheduler": sched2}, requires_safety_checker=False).save_pretrained(
        str(folder), safe_serialization=True)
    # sd2's UNet and VAE files verbatim (the fp16 variant left out); the text encoder as one file
    for comp in ("unet", "vae"):
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copyfile(FIX / "sd2" / comp / f, folder / comp / f)
    assert not (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert (folder / "text_encoder" / "model.safetensors").exists()
    replace_parts(FIX / "sd2", folder, ["tokenizer"])
    return FIX / "sdxl-turbo", folder


def build_lcm():
    # (from_config would drop keys listed in _use_default_values: time_cond_proj_dim is one)
    cfg = {k: v for k, v in mf.make_unet(False).config.items() if k != "_use_default_values"}
    cfg["time_cond_proj_dim"] = 16
    unet = seeded(SEEDS["lcm"], lambda: UNet2DConditionModel.from_config(cfg))
    assert unet.config.time_cond_proj_dim == 16 and unet.time_embedding.cond_proj is not None
    p1 = StableDiffusionPipeline.from_pretrained(str(FIX / "sd1"))
    folder = FIX / "lcm"
    LatentConsistencyModelPipeline(
        vae=p1.vae, text_encoder=p1.text_encoder, tokenizer=p1.tokenizer, unet=unet,
        scheduler=LCMScheduler.from_config(LCM_SCHED), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(str(folder), safe_serialization=True)
    replace_parts(FIX / "sd1", folder, ["vae", "text_encoder", "tokenizer"])
    return folder


def build_controlnet_xl():
    unet = UNet2DConditionModel.from_pretrained(str(FIX / "sdxl" / "unet"))
    cn = seeded(SEEDS["controlnet"], lambda: ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16, 32, 64), load_weights_from_unet=False))
    with torch.no_grad():
        for m in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]:
            m.weight.mul_(CN_SCALE)
            m.bias.mul_(CN_SCALE)
    folder = FIX / "controlnet-xl"
    cn.save_pretrained(str(folder), safe_serialization=True)
    return folder


def build_taesd():
    vae = seeded(SEEDS["taesd"], lambda: AutoencoderTiny(**TAESD))
    with torch.no_grad():  # the decoder's last conv: centred on 0.5, TAESD's own [0, 1] output convention
        last = vae.decoder.layers[-1]
        last.weight.mul_(0.3)
        last.bias.mul_(0.3).add_(0.5)
    folder = FIX / "taesd"
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------
# single files in the original SGM (Stability generative-models) layout: inverse of diffusers'
# convert_ldm_unet_checkpoint (+ add_embedding <- label_emb.0), convert_ldm_vae_checkpoint,
# convert_ldm_clip_checkpoint (conditioner.embedders.0.transformer.) and convert_open_clip_checkpoint
# --------------------------------------------------------------------------------------------


def unet_to_sgm(sd, cfg):
    """make_fixtures.unet_to_ldm already places every block by its (level, layer) index, which covers
    SDXL's layouts (DownBlock2D levels without attentions, a 4th level, upsamplers at output_blocks.N.1
    for UpBlock2D and .2 after an attention); SDXL adds label_emb.0.{0,2} = add_embedding.linear_{1,2}."""
    add = {k: v for k, v in sd.items() if k.startswith("add_embedding.")}
    out = mf.unet_to_ldm({k: v for k, v in sd.items() if k not in add}, cfg)
    for k, v in add.items():
        lin, rest = k.split(".")[1], k.split(".")[2]
        out[f"model.diffusion_model.label_emb.0.{0 if lin == 'linear_1' else 2}.{rest}"] = v
    return out


def te2_to_open_clip(sd, prefix):
    """HF CLIPTextModelWithProjection -> OpenCLIP text tower (all layers: SDXL's te2 keeps its last
    layer, unlike SD2) with q;k;v stacked in in_proj and text_projection as [width, proj] (x @ P)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n):
        L = {k[len(f"encoder.layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"encoder.layers.{i}.")}
        r = f"transformer.resblocks.{i}."
        out[r + "ln_1.weight"], out[r + "ln_1.bias"] = L["layer_norm1.weight"], L["layer_norm1.bias"]
        out[r + "attn.in_proj_weight"] = torch.cat([L[f"self_attn.{x}_proj.weight"] for x in "qkv"], 0)
        out[r + "attn.in_proj_bias"] = torch.cat([L[f"self_attn.{x}_proj.bias"] for x in "qkv"], 0)
        out[r + "attn.out_proj.weight"], out[r + "attn.out_proj.bias"] = L["self_attn.out_proj.weight"], L["self_attn.out_proj.bias"]
        out[r + "ln_2.weight"], out[r + "ln_2.bias"] = L["layer_norm2.weight"], L["layer_norm2.bias"]
        out[r + "mlp.c_fc.weight"], out[r + "mlp.c_fc.bias"] = L["mlp.fc1.weight"], L["mlp.fc1.bias"]
        out[r + "mlp.c_proj.weight"], out[r + "mlp.c_proj.bias"] = L["mlp.fc2.weight"], L["mlp.fc2.bias"]
    assert n == 3 and len(out) == 6 + 12 * n
    return {prefix + k: v for k, v in out.items()}


def component_sd(folder, comp):
    f = folder / comp
    st = f / ("model.safetensors" if (f / "model.safetensors").exists() else "diffusion_pytorch_model.safetensors")
    return load_file(str(st)), json.loads((f / "config.json").read_text())


def write_sgm_file(name, folder, refiner):
    unet_sd, unet_cfg = component_sd(folder, "unet")
    vae_sd, vae_cfg = component_sd(folder, "vae")
    te2_sd, _ = component_sd(folder, "text_encoder_2")
    ckpt = {}
    ckpt.update(unet_to_sgm(unet_sd, unet_cfg))
    ckpt.update(mf.vae_to_ldm(vae_sd, vae_cfg))
    if refiner:
        ckpt.update(te2_to_open_clip(te2_sd, "conditioner.embedders.0.model."))
    else:
        te1_sd, _ = component_sd(folder, "text_encoder")
        for k, v in te1_sd.items():  # the transformers < 5.6 layout (text_model.*) that real SDXL files hold
            ckpt["conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model.")] = v
        ckpt["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        ckpt.update(te2_to_open_clip(te2_sd, "conditioner.embedders.1.model."))
    ckpt = {k: ckpt[k].contiguous() for k in sorted(ckpt)}
    path = FIX / f"{name}.safetensors"
    save_file(ckpt, str(path))
    return path


def verify_sgm_file(path, folder, refiner):
    """diffusers' own from_single_file(config=folder) must reproduce every tensor of the folder."""
    kw = dict(config=str(folder), local_files_only=True)
    u = UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kw)
    mf.assert_same(u.state_dict(), component_sd(folder, "unet")[0], f"{path.name} unet")
    v = AutoencoderKL.from_single_file(str(path), subfolder="vae", **kw)
    mf.assert_same(v.state_dict(), component_sd(folder, "vae")[0], f"{path.name} vae")
    ckpt = load_single_file_checkpoint(str(path))
    t2 = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, ckpt, subfolder="text_encoder_2", **kw)
    mf.assert_same(t2.state_dict(), CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2")).state_dict(),
                   f"{path.name} text_encoder_2")
    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    if not refiner:
        t1 = create_diffusers_clip_model_from_ldm(CLIPTextModel, ckpt, subfolder="text_encoder", **kw)
        mf.assert_same(t1.state_dict(), CLIPTextModel.from_pretrained(str(folder / "text_encoder")).state_dict(),
                       f"{path.name} text_encoder")
    pipe = cls.from_single_file(str(path), **kw)
    ref = cls.from_pretrained(str(folder))
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, comp), getattr(ref, comp)
        assert (a is None) == (b is None), comp
        if a is not None:
            mf.assert_same(a.state_dict(), b.state_dict(), f"{path.name} pipeline {comp}")
    assert type(pipe.scheduler) is type(ref.scheduler) and dict(pipe.scheduler.config) == dict(ref.scheduler.config)
    for t in ("tokenizer", "tokenizer_2"):
        a, b = getattr(pipe, t), getattr(ref, t)
        assert (a is None) == (b is None) and (a is None or (a.get_vocab() == b.get_vocab() and a.pad_token == b.pad_token)), t
    nonpriv = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert nonpriv(pipe.config) == nonpriv(ref.config), (dict(pipe.config), dict(ref.config))
    assert getattr(pipe, "watermark", None) is None
    print(f"  {path.name}: components and pipeline from_single_file(config=folder) match the folder")
    return pipe


# --------------------------------------------------------------------------------------------
# LoRA files
# --------------------------------------------------------------------------------------------

# module suffix (diffusers name) -> (kind, rank); kinds decide alpha and the kohya conv layout
SD1_KOHYA_TARGETS = [
    ("attn1.to_q", "attn", 4), ("attn1.to_k", "attn", 4), ("attn1.to_v", "attn", 4), ("attn1.to_out.0", "attn", 4),
    ("attn2.to_q", "attn", 4), ("attn2.to_k", "attn", 4), ("attn2.to_v", "attn", 4), ("attn2.to_out.0", "attn", 4),
    ("ff.net.0.proj", "ff", 4), ("ff.net.2", "ff", 4),
    ("proj_in", "proj", 4), ("proj_out", "proj", 4),
    ("conv1", "conv", 2), ("conv2", "conv", 2), ("conv_shortcut", "conv", 2), ("time_emb_proj", "emb", 2),
    ("downsamplers.0.conv", "conv", 2), ("upsamplers.0.conv", "conv", 2),
]
TE_TARGETS = [("self_attn.q_proj", "attn", 4), ("self_attn.k_proj", "attn", 4), ("self_attn.v_proj", "attn", 4),
              ("self_attn.out_proj", "attn", 4), ("mlp.fc1", "mlp", 2), ("mlp.fc2", "mlp", 2)]
KOHYA_ALPHA = 2.0
# modules written WITHOUT an .alpha entry: only rank-2 ones, where kohya/A1111's "no alpha => scale 1"
# and diffusers' "no alpha => the file's (single) alpha value" agree (2/2), see NOTES["lora"]
NO_ALPHA = ("conv_shortcut", "time_emb_proj", "mlp.fc2")
LORA_UP_SCALE = {"sd1-kohya": 0.35, "sd1-peft": 0.2, "sdxl-kohya": 0.35, "sd1-lcm-peft": 0.25}


def lora_pair(g, w, r, up_scale):
    """(down, up) for base weight w: Linear [out, in] -> [r, in], [out, r]; Conv2d [out, in, k, k] ->
    [r, in, k, k] (LoCon: the base kernel), [out, r, 1, 1]. down ~ randn/sqrt(fan_in), up ~ s*randn/sqrt(r)."""
    fan_in = w[0].numel()
    if w.ndim == 4:
        down = torch.randn(r, *w.shape[1:], generator=g) / math.sqrt(fan_in)
        up = torch.randn(w.shape[0], r, 1, 1, generator=g) * (up_scale / math.sqrt(r))
    else:
        down = torch.randn(r, w.shape[1], generator=g) / math.sqrt(fan_in)
        up = torch.randn(w.shape[0], r, generator=g) * (up_scale / math.sqrt(r))
    return down, up


def select(model, targets):
    """[(module name, kind, rank)] of every module whose name ends with one of `targets`, in model order."""
    out = []
    for name, m in model.named_modules():
        for suffix, kind, r in targets:
            if name == suffix or name.endswith("." + suffix):
                assert isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)), (name, type(m))
                out.append((name, kind, r))
                break
    return out


def kohya_entries(model, targets, prefix, key_of, g, up_scale):
    """kohya tensors for `model` and the intended LoRA per diffusers module: {module: (down, up, alpha, r)}."""
    sd, intended = {}, {}
    mods = dict(model.named_modules())
    for name, kind, r in select(model, targets):
        down, up = lora_pair(g, mods[name].weight, r, up_scale)
        key = prefix + key_of(name).replace(".", "_")
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
        alpha = None if name.endswith(NO_ALPHA) else KOHYA_ALPHA
        if alpha is not None:
            sd[key + ".alpha"] = torch.tensor(alpha)
        intended[name] = (down, up, alpha, r)
    return sd, intended


def sgm_module_name(name, cfg):
    """diffusers UNet module path -> the SGM UNet's (kohya sd-scripts names SDXL LoRA modules by it)."""
    k = mf.unet_to_ldm({name + ".weight": None}, cfg)
    (full,) = k
    return full.removeprefix("model.diffusion_model.").removesuffix(".weight")


def build_sd1_kohya(p1):
    g = mf.gen(SEEDS["lora"])
    s = LORA_UP_SCALE["sd1-kohya"]
    sd, iu = kohya_entries(p1.unet, SD1_KOHYA_TARGETS, "lora_unet_", lambda n: n, g, s)
    # kohya names SD1 text-encoder modules from the transformers < 5.6 CLIPTextModel (text_model.*)
    te_sd, it = kohya_entries(p1.text_encoder, TE_TARGETS, "lora_te_", lambda n: "text_model." + n, g, s)
    sd.update(te_sd)
    sd = {k: sd[k].contiguous() for k in sorted(sd)}
    save_file(sd, str(LORA / "sd1-kohya.safetensors"))
    torch.save(sd, str(LORA / "sd1-kohya.pt"))
    return {"unet": iu, "text_encoder": it}


def build_sdxl_kohya(px):
    g = mf.gen(SEEDS["lora"] + 2)
    s = LORA_UP_SCALE["sdxl-kohya"]
    cfg = dict(px.unet.config)
    sd, iu = kohya_entries(px.unet, SD1_KOHYA_TARGETS, "lora_unet_", lambda n: sgm_module_name(n, cfg), g, s)
    for k in sd:
        assert re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d+_", k), k
    t1, i1 = kohya_entries(px.text_encoder, TE_TARGETS, "lora_te1_", lambda n: "text_model." + n, g, s)
    t2, i2 = kohya_entries(px.text_encoder_2, TE_TARGETS, "lora_te2_", lambda n: n, g, s)  # still text_model.*
    sd.update(t1)
    sd.update(t2)
    sd = {k: sd[k].contiguous() for k in sorted(sd)}
    save_file(sd, str(LORA / "sdxl-kohya.safetensors"))
    # the file must be exactly the inverse of diffusers' SGM-block and key conversion for this UNet
    conv = _maybe_map_sgm_blocks_to_diffusers(dict(sd), px.unet.config)
    conv, alphas = _convert_non_diffusers_lora_to_diffusers(conv)
    assert len(conv) == 2 * (len(iu) + len(i1) + len(i2)), "kohya SDXL keys lost in conversion"
    return {"unet": iu, "text_encoder": i1, "text_encoder_2": i2}


PEFT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
PEFT_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LCM_TARGETS = PEFT_UNET_TARGETS + ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
                                   "upsamplers.0.conv"]


def fill_adapter(model, name, g, up_scale):
    """Seeded values for every lora_A / lora_B of adapter `name` (B non-zero); {module: (A, B)}."""
    intended = {}
    with torch.no_grad():
        for mname, m in model.named_modules():
            if isinstance(m, BaseTunerLayer) and name in m.lora_A:
                a, b = m.lora_A[name].weight, m.lora_B[name].weight
                down, up = lora_pair(g, m.get_base_layer().weight, a.shape[0], up_scale)
                assert down.shape == a.shape and up.shape == b.shape, (mname, a.shape, b.shape)
                a.copy_(down)
                b.copy_(up)
                intended[mname] = (down.clone(), up.clone())
    return intended


def build_peft_lora(file, comps, targets, r, alpha, seed, up_scale, metadata):
    """Adapters added with PEFT, filled with seeded values, written the way diffusers' training scripts
    do: StableDiffusionLoraLoaderMixin.save_lora_weights(unet_lora_layers=get_peft_model_state_dict(...),
    ..., *_lora_adapter_metadata=LoraConfig.to_dict()) -> keys unet.<module>.lora_A.weight, the
    config as JSON under the safetensors metadata key "lora_adapter_metadata"."""
    g = mf.gen(seed)
    layers, meta, intended = {}, {}, {}
    for comp, model in comps.items():
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets[comp], init_lora_weights=False)
        model.add_adapter(cfg, adapter_name="build")
        intended[comp] = fill_adapter(model, "build", g, up_scale)
        sd = get_peft_model_state_dict(model, adapter_name="build")
        if comp == "text_encoder":  # the transformers < 5.6 names every shared SD1 LoRA file carries
            sd = {"text_model." + k: v for k, v in sd.items()}
        layers[f"{comp}_lora_layers"] = {k: v.detach().clone().contiguous() for k, v in sd.items()}
        if metadata:
            m = model.peft_config["build"].to_dict()
            # reproducible and machine-independent: sorted target list (a set), no absolute base-model path
            m["target_modules"] = sorted(m["target_modules"])
            m["base_model_name_or_path"] = None
            meta[f"{comp}_lora_adapter_metadata"] = m
    StableDiffusionPipeline.save_lora_weights(str(LORA), weight_name=file, safe_serialization=True, **layers, **meta)
    canonical_header(LORA / file)
    return intended


def canonical_header(path):
    """safetensors writes its __metadata__ map in Rust HashMap order (random per process when it holds more
    than one key): rewrite the header JSON with sorted metadata keys and tensors in offset order. Same
    tensors, same byte offsets, same metadata; a valid safetensors file."""
    import struct
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    out = {}
    if meta is not None:
        out["__metadata__"] = {k: meta[k] for k in sorted(meta)}
    for k in sorted(header, key=lambda k: (header[k]["data_offsets"][0], k)):
        out[k] = header[k]
    h = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()
    h += b" " * (-len(h) % 8)
    before = load_file(str(path))
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    after = load_file(str(path))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta


def loaded_lora(model, adapter):
    """{module: {r, alpha (lora_alpha), scaling, A, B}} of `adapter` as PEFT holds it after loading."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer) and adapter in m.lora_A:
            out[name] = {"r": m.r[adapter], "lora_alpha": float(m.lora_alpha[adapter]), "scaling": float(m.scaling[adapter]),
                         "A": m.lora_A[adapter].weight.detach(), "B": m.lora_B[adapter].weight.detach(),
                         "A_kernel": list(m.lora_A[adapter].weight.shape[2:]) if m.lora_A[adapter].weight.ndim == 4 else None}
    return out


class WarnCatcher(logging.Handler):
    """Collects diffusers' warnings (peft incompatible keys, unconverted keys) during a load."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.msgs = []

    def emit(self, record):
        self.msgs.append(record.getMessage())

    def __enter__(self):
        self.logger = logging.getLogger("diffusers")
        self.saved = (self.logger.level, list(self.logger.handlers))
        self.logger.setLevel(logging.WARNING)
        self.logger.handlers = [self]  # collected, not printed
        return self

    def __exit__(self, *a):
        self.logger.setLevel(self.saved[0])
        self.logger.handlers = self.saved[1]


def load_lora(pipe, file, adapter):
    with WarnCatcher() as wc:
        pipe.load_lora_weights(str(LORA / file), adapter_name=adapter)
    bad = [m for m in wc.msgs if any(w in m.lower() for w in ("unexpected keys", "missing keys", "correctly renamed", "unsuccessful"))]
    assert not bad, (file, bad)
    return wc.msgs


def check_lora(pipe, adapter, intended, peft_alpha=None, r_peft=None):
    """Every intended module carries exactly the file's tensors; returns the effective per-module
    table (rank, file alpha, diffusers' scaling at weight 1.0)."""
    table = {}
    for comp, want in intended.items():
        got = loaded_lora(getattr(pipe, comp), adapter)
        assert set(got) == set(want), (comp, sorted(set(got) ^ set(want))[:6])
        for name, w in want.items():
            down, up = w[0], w[1]
            g = got[name]
            assert torch.equal(g["A"], down) and torch.equal(g["B"], up), (comp, name)
            if len(w) == 4:  # kohya: (down, up, alpha, r)
                alpha, r = w[2], w[3]
                expect = (alpha if alpha is not None else r) / r  # kohya / A1111: no alpha => scale 1
            else:
                alpha, r = peft_alpha, r_peft
                expect = alpha / r
            assert g["r"] == r and math.isclose(g["scaling"], expect, rel_tol=1e-12), (comp, name, g["r"], g["scaling"], expect)
            table[f"{comp}.{name}"] = [r, alpha, g["scaling"], g["A_kernel"]]
    return table


# --------------------------------------------------------------------------------------------
# textual inversion, .ckpt copies, malformed inputs
# --------------------------------------------------------------------------------------------


def build_embeddings():
    g = mf.gen(SEEDS["embeddings"])
    cat = 0.5 * torch.randn(2, mf.HIDDEN, generator=g)
    style = 0.5 * torch.randn(3, mf.HIDDEN, generator=g)
    pair_l = 0.5 * torch.randn(2, mf.HIDDEN, generator=g)
    pair_g = 0.5 * torch.randn(2, TE2_HIDDEN, generator=g)
    save_file({"<cat-toy>": cat}, str(EMB / "cat-toy.safetensors"))  # diffusers learned_embeds layout
    save_file({"emb_params": style}, str(EMB / "a1111-style.safetensors"))  # A1111 .safetensors layout
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": style.clone()}, "name": "a1111-style",
                "step": 100, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "sd1"}, str(EMB / "a1111-style.pt"))
    save_file({"clip_l": pair_l, "clip_g": pair_g}, str(EMB / "sdxl-pair.safetensors"))
    return {"cat": cat, "style": style, "pair_l": pair_l, "pair_g": pair_g}


def build_ckpt_and_bad():
    sd = load_file(str(FIX / "sd1.safetensors"))
    torch.save({"state_dict": sd, "global_step": 5, "epoch": 1}, str(FIX / "sd1.ckpt"))
    back = load_single_file_checkpoint(str(FIX / "sd1.ckpt"))  # diffusers' reader (weights_only torch.load)
    mf.assert_same(back, sd, "sd1.ckpt")
    pipe = StableDiffusionPipeline.from_single_file(str(FIX / "sd1.ckpt"), config=str(FIX / "sd1"), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    ref = StableDiffusionPipeline.from_pretrained(str(FIX / "sd1"))
    for comp in ("unet", "vae", "text_encoder"):
        mf.assert_same(getattr(pipe, comp).state_dict(), getattr(ref, comp).state_dict(), f"sd1.ckpt {comp}")
    print("  sd1.ckpt: load_single_file_checkpoint == sd1.safetensors; from_single_file(config=sd1) == sd1/")

    class OsSystem:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "payload": OsSystem()},
               str(BAD / "os_system.ckpt"))
    # inspect the pickle without running it
    import pickletools
    import zipfile
    with zipfile.ZipFile(BAD / "os_system.ckpt") as z:
        data = z.read("os_system/data.pkl")
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert ("SHORT_BINUNICODE", "echo pwned") in ops or ("BINUNICODE", "echo pwned") in ops, ops
    assert any(name in ("GLOBAL", "STACK_GLOBAL") for name, _ in ops) and b"system" in data
    src = (EMB / "a1111-style.pt").read_bytes()
    (BAD / "truncated.ckpt").write_bytes(src[: int(len(src) * 0.6)])
    legacy_save({"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "note": "legacy"}, BAD / "legacy.pt")
    return {"os_system.ckpt": "torch.save zip; data.pkl's payload pickles os.system('echo pwned') via __reduce__ (GLOBAL posix system + REDUCE)",
            "truncated.ckpt": f"the first {int(len(src) * 0.6)} of {len(src)} bytes of embeddings/a1111-style.pt (zip cut inside the archive)",
            "legacy.pt": "torch.save(..., _use_new_zipfile_serialization=False): the pre-1.6 pickle format (magic number, no zip)"}


def legacy_save(obj, path):
    """torch.save(obj, _use_new_zipfile_serialization=False) with reproducible bytes: the legacy format names
    each storage str(storage._cdata) (a memory address); rename them "0", "1", ... (BINUNICODE strings inside
    the pickles; the raw storage records after them carry no offsets, so lengths may change)."""
    import io
    import struct
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    tensors = [v for v in obj.values() if torch.is_tensor(v)]
    for i, t in enumerate(tensors):
        key = str(t.untyped_storage()._cdata).encode()
        old = b"X" + struct.pack("<I", len(key)) + key
        assert data.count(old) == 2, "storage key not found twice (object pickle + key list)"
        new = str(i).encode()
        data = data.replace(old, b"X" + struct.pack("<I", len(new)) + new)
    assert not data.startswith(b"PK")
    Path(path).write_bytes(data)
    back = torch.load(str(path), weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in obj.items() if torch.is_tensor(v))


# --------------------------------------------------------------------------------------------
# q4_0 replica (ldm-web src/gpu/dtype.rs encode_q4_0 / decode_q4_0, numpy float32)
# --------------------------------------------------------------------------------------------


def q4_0_dequant(w):
    """Row-wise blocks of 32 (last block zero-padded); per block m = the first value of largest |x|,
    d = f16(m / -8) (f32 division), id = 1/f32(d) (0 if d == 0), q = clamp(round_half_away(x*id + 8), 0, 15)
    in f32 (multiply, then add), value = (q - 8) * f32(d)."""
    shape = w.shape
    rows = shape[0]
    x = np.ascontiguousarray(w.reshape(rows, -1), dtype=np.float32)
    L = x.shape[1]
    nb = -(-L // 32)
    xp = np.zeros((rows, nb * 32), np.float32)
    xp[:, :L] = x
    blk = xp.reshape(rows, nb, 32)
    idx = np.argmax(np.abs(blk), axis=-1)  # first maximal |x| (numpy argmax returns the first)
    m = np.take_along_axis(blk, idx[..., None], axis=-1)[..., 0]
    d = (m / np.float32(-8.0)).astype(np.float32).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / np.where(d != 0, d, np.float32(1.0)), np.float32(0.0)).astype(np.float32)
    y = (blk * inv[..., None]).astype(np.float32)
    y = (y + np.float32(8.0)).astype(np.float32)
    y64 = y.astype(np.float64)  # exact; round half away from zero in f64 (|y| + 0.5 is exact there)
    q = np.where(y64 >= 0, np.floor(y64 + 0.5), -np.floor(-y64 + 0.5))
    q = np.clip(q, 0, 15).astype(np.float32)
    deq = ((q - np.float32(8.0)) * d[..., None]).astype(np.float32)
    return deq.reshape(rows, nb * 32)[:, :L].reshape(shape)


def q4_unet(unet):
    """Every nn.Linear / nn.Conv2d weight with row length prod(shape[1:]) >= 32 replaced (in memory) by
    its q4_0 round trip; biases, norms and embeddings untouched. Returns the replaced names."""
    names = []
    with torch.no_grad():
        for mname, m in unet.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight[0].numel() >= 32:
                m.weight.copy_(torch.from_numpy(q4_0_dequant(m.weight.detach().numpy())))
                names.append(mname + ".weight")
    return names


def q4_selftest():
    """Hand-checked blocks: ties, zero blocks, padding, a value that rounds at exactly .5."""
    v = np.zeros((1, 40), np.float32)
    v[0, :5] = [1.0, -2.0, 2.0, 0.5, -1.375]
    v[0, 35] = 3.0
    out = q4_0_dequant(v)
    # block 0: m = -2 (the first of |x| = 2), d = 0.25, id = 4: 1 -> q 12 -> 1.0; -2 -> 0 -> -2; 2 -> 16, clamped
    # to 15 -> 1.75; 0.5 -> 10 -> 0.5; -1.375 -> 2.5 -> 3 (half away from zero; not 2) -> -1.25
    assert out[0, :5].tolist() == [1.0, -2.0, 1.75, 0.5, -1.25], out[0, :5]
    # block 1 (8 values + 24 padding zeros): m = 3, d = -0.375, id = -2.6666667: 3 -> 0 -> 3.0
    assert out[0, 35] == 3.0 and not out[0, 32:35].any()
    assert not q4_0_dequant(np.zeros((2, 64), np.float32)).any()


# --------------------------------------------------------------------------------------------
# AUTOMATIC1111 prompt weighting, reimplemented from stable-diffusion-webui's published source
# (modules/prompt_parser.py parse_prompt_attention, modules/sd_hijack_clip.py
# FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line / process_tokens, modules/sd_emphasis.py
# EmphasisOriginal, modules/sd_hijack_open_clip.py for the OpenCLIP pad id). Options as shipped:
# emphasis "Original", comma_padding_backtrack 20, CLIP_stop_at_last_layers 1.
# --------------------------------------------------------------------------------------------

A1111_RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
A1111_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
A1111_CHUNK = 75
A1111_COMMA_BACKTRACK = 20


def a1111_parse_prompt_attention(text):
    """[[text, weight], ...]: (x) x1.1, [x] /1.1, (x:w) xw, \\( \\) \\[ \\] \\\\ literals, unbalanced brackets
    closed at the end, BREAK -> ["BREAK", -1], runs of equal weight merged."""
    res, round_brackets, square_brackets = [], [], []

    def multiply_range(start, mult):
        for p in range(start, len(res)):
            res[p][1] *= mult

    for m in A1111_RE_ATTENTION.finditer(text):
        t, weight = m.group(0), m.group(1)
        if t.startswith("\\"):
            res.append([t[1:], 1.0])
        elif t == "(":
            round_brackets.append(len(res))
        elif t == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif t == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif t == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(A1111_RE_BREAK, t)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def a1111_tokenize_line(tok, line):
    """tokenize_line: each parsed segment tokenized alone (no special tokens); chunks of 75 tokens; when
    a chunk is full and its last comma is at most 20 tokens back, the tokens after that comma move to
    the next chunk; BREAK closes the chunk; each chunk = [bos] + tokens + eos padding to 75 + [eos],
    multipliers 1.0 on bos / eos / padding. Returns (parsed, [(tokens, multipliers)], backtracked)."""
    parsed = a1111_parse_prompt_attention(line)
    tokenized = tok([t for t, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    comma = tok.get_vocab()[",</w>"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    chunks, cur_t, cur_m = [], [], []
    state = {"last_comma": -1, "backtracked": False}

    def next_chunk():
        nonlocal cur_t, cur_m
        add = A1111_CHUNK - len(cur_t)
        if add > 0:
            cur_t, cur_m = cur_t + [eos] * add, cur_m + [1.0] * add
        chunks.append(([bos] + cur_t + [eos], [1.0] + cur_m + [1.0]))
        state["last_comma"] = -1
        cur_t, cur_m = [], []

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in tokens:
            if token == comma:
                state["last_comma"] = len(cur_t)
            elif (A1111_COMMA_BACKTRACK != 0 and len(cur_t) == A1111_CHUNK and state["last_comma"] != -1
                  and len(cur_t) - state["last_comma"] <= A1111_COMMA_BACKTRACK):
                cut = state["last_comma"] + 1
                reloc_t, reloc_m = cur_t[cut:], cur_m[cut:]
                cur_t, cur_m = cur_t[:cut], cur_m[:cut]
                next_chunk()
                cur_t, cur_m = reloc_t, reloc_m
                state["backtracked"] = True
            if len(cur_t) == A1111_CHUNK:
                next_chunk()
            cur_t.append(token)
            cur_m.append(weight)
    if cur_t or not chunks:
        next_chunk()
    return parsed, chunks, state["backtracked"]


@torch.no_grad()
def a1111_embeddings(encoders, prompt):
    """A1111's conditioning for `prompt`. encoders: [(tokenizer, text_encoder, layer)] with layer "last"
    (last_hidden_state, SD1) or "penultimate" (hidden_states[-2], no final LayerNorm: SDXL's te1 and
    te2). Per chunk and per encoder: positions after the first eos get the tokenizer's pad id when it
    differs from eos (sd_hijack_clip.process_tokens); z = the encoder output; emphasis "Original":
    m0 = z.mean(); z = z * mult[..., None]; z = z * (m0 / z.mean()). The encoders' z are concatenated
    on the channels (SDXL), chunks on the sequence. Pooled (when an encoder has a projection): its
    text_embeds of the FIRST chunk, unweighted. Returns (embeddings [1, 77*n, C], pooled or None, info)."""
    info, per_chunk, pooled = [], None, None
    for tok, te, layer in encoders:
        parsed, chunks, backtracked = a1111_tokenize_line(tok, prompt)
        zs, enc_chunks = [], []
        for ci, (tokens, mults) in enumerate(chunks):
            ids = list(tokens)
            if tok.pad_token_id != tok.eos_token_id:
                first = ids.index(tok.eos_token_id)
                ids[first + 1:] = [tok.pad_token_id] * (len(ids) - first - 1)
            out = te(torch.tensor([ids]), output_hidden_states=True)
            z = out.last_hidden_state if layer == "last" else out.hidden_states[-2]
            m = torch.tensor([mults], dtype=torch.float32)
            original_mean = z.mean()
            z = z * m.reshape(m.shape + (1,)).expand(z.shape)
            new_mean = z.mean()
            z = z * (original_mean / new_mean)
            zs.append(z)
            if ci == 0 and hasattr(out, "text_embeds"):
                pooled = out.text_embeds
            enc_chunks.append({"tokens": ids, "multipliers": [float(x) for x in mults]})
        per_chunk = zs if per_chunk is None else [torch.cat([a, b], dim=-1) for a, b in zip(per_chunk, zs)]
        info.append({"parsed": [[t, float(w)] for t, w in parsed], "chunks": enc_chunks, "backtracked": backtracked})
    return torch.hstack(per_chunk), pooled, info


def a1111_selftest():
    """The docstring examples of A1111's parse_prompt_attention."""
    P = a1111_parse_prompt_attention
    assert P("normal text") == [["normal text", 1.0]]
    assert P("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert P("(unbalanced") == [["unbalanced", 1.1]]
    assert P("\\(literal\\]") == [["(literal]", 1.0]]
    assert P("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    assert P("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]
    assert P("a BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert P("(x: 0.5 )") == [["x", 0.5]]


def long_comma_prompt(tok):
    """> 75 tokens of short comma-separated phrases, so the first chunk fills up a few tokens after a
    comma and the comma back-track moves the tail of the chunk to the next one."""
    phrases = ["red apple", "blue sky", "green field", "old castle", "starry night", "golden hour", "sharp focus",
               "soft light", "wooden table", "cup of coffee"]
    p, i = "", 0
    while len(tok(p, add_special_tokens=False).input_ids) <= 80:
        p = (p + ", " if p else "") + phrases[i % len(phrases)]
        i += 1
    return p


# --------------------------------------------------------------------------------------------
# cases (settings as data; the runner below builds, runs, traces and records them)
# --------------------------------------------------------------------------------------------

LANDSCAPE = "a painting of a beautiful landscape with mountains and a lake"
CASES = [
    # 0-1 SDXL text-to-image
    dict(kind="xl", model="sdxl", steps=4, guidance=5.0, width=64, height=64, negative_prompt=NEG),
    dict(kind="xl", model="sdxl", scheduler="dpmpp-2m", steps=5, guidance=7.0, width=96, height=64, batch=2,
         prompt_2=LANDSCAPE, xl=dict(original_size=(128, 128), crops_coords_top_left=(8, 16), target_size=(64, 96),
                                     negative_original_size=(32, 32), negative_target_size=(64, 96))),
    # 2 base -> refiner hand-over in latent space
    dict(kind="xl_refine", model="sdxl", refiner="sdxl-refiner", steps=5, guidance=5.0, width=64, height=64,
         denoising=0.8),
    # 3-4 SDXL img2img: the refiner (aesthetic-score time ids) and the base components (size time ids)
    dict(kind="xl_img2img", model="sdxl-refiner", steps=5, guidance=5.0, image="init.png", negative_prompt=NEG,
         xl=dict(aesthetic_score=7.0, negative_aesthetic_score=2.0)),
    dict(kind="xl_img2img", model="sdxl", scheduler="euler-a", steps=5, guidance=5.0, image="init.png", strength=0.6),
    # 5-6 SDXL inpainting: 4-channel base (latent blending, default strength 0.9999) and 9-channel UNet
    dict(kind="xl_inpaint", model="sdxl", steps=5, guidance=5.0, image="init.png", mask="mask.png"),
    dict(kind="xl_inpaint", model="sdxl-inpaint", steps=4, guidance=5.0, image="init.png", mask="mask.png",
         strength=1.0, batch=2),
    # 7-10 turbo models (no CFG)
    dict(kind="xl", model="sdxl-turbo", steps=1, guidance=0.0, width=64, height=64),
    dict(kind="xl", model="sdxl-turbo", steps=4, guidance=0.0, width=64, height=64),
    dict(kind="sd", model="sd-turbo", steps=2, guidance=0.0, width=64, height=64),
    dict(kind="sd_img2img", model="sd-turbo", steps=2, guidance=0.0, image="init.png", strength=0.5),
    # 11-12 latent consistency model
    dict(kind="lcm", model="lcm", steps=4, guidance=8.5, width=64, height=64),
    dict(kind="lcm", model="lcm", steps=2, guidance=1.0, width=64, height=64, batch=2),
    # 13 SDXL ControlNet
    dict(kind="xl_controlnet", model="sdxl", controlnet="controlnet-xl", control="control.png", scale=0.8, steps=4,
         guidance=5.0, width=96, height=64),
    # 14-19 LoRA (unfused, as load_lora_weights leaves them; weights via set_adapters)
    dict(kind="sd", model="sd1", steps=4, loras=[("sd1-kohya.safetensors", 1.0)]),
    dict(kind="sd", model="sd1", scheduler="euler-a", steps=4, loras=[("sd1-peft.safetensors", 0.8)]),
    dict(kind="sd", model="sd1", scheduler="dpmpp-2m", steps=4,
         loras=[("sd1-kohya.safetensors", 0.7), ("sd1-peft.safetensors", -0.4)]),
    dict(kind="xl", model="sdxl", steps=4, guidance=5.0, width=64, height=64, loras=[("sdxl-kohya.safetensors", 0.9)]),
    dict(kind="sd", model="sd1", scheduler="lcm", steps=4, guidance=1.0, loras=[("sd1-lcm-peft.safetensors", 1.0)]),
    dict(kind="sd", model="sd1", steps=4, q4=True, loras=[("sd1-kohya.safetensors", 1.0)], seed_of=14),
    # 20-21 textual inversion
    dict(kind="sd", model="sd1", steps=4, prompt="a photo of <cat-toy> on a table", negative_prompt="a1111-style, blurry",
         embeddings=[("cat-toy.safetensors", "<cat-toy>"), ("a1111-style.safetensors", "a1111-style")]),
    dict(kind="xl", model="sdxl", steps=4, guidance=5.0, width=64, height=64, prompt="a photo of <pair> on a table",
         embeddings_xl=("sdxl-pair.safetensors", "<pair>")),
    # 22 TAESD as the pipeline's VAE
    dict(kind="sd", model="sd1", steps=4, vae="taesd"),
    # 23-24 scheduler switched the way users do it (no overrides)
    dict(kind="sd", model="sd1", scheduler="ddim", steps=5),
    dict(kind="sd", model="sd1", scheduler="ddpm", steps=5),
    # 25 LDMPipeline at twice its sample_size
    dict(kind="ldm", model="ldm/uncond", steps=3, eta=0.0, seed=11, sample_size=16),
    # 26 single-file SDXL (= case 0)
    dict(kind="xl", model="sdxl.safetensors", same_as=0),
    # 27 A1111-weighted prompt embeddings into StableDiffusionPipeline
    dict(kind="sd", model="sd1", steps=4, a1111=("(red:1.3) apple, [blue] sky", "blurry")),
    # 28 single-file refiner (= case 3)
    dict(kind="xl_img2img", model="sdxl-refiner.safetensors", same_as=3),
]

PIPE_CLASS = {
    "xl": StableDiffusionXLPipeline, "xl_refine": StableDiffusionXLImg2ImgPipeline,
    "xl_img2img": StableDiffusionXLImg2ImgPipeline, "xl_inpaint": StableDiffusionXLInpaintPipeline,
    "xl_controlnet": StableDiffusionXLControlNetPipeline, "sd": StableDiffusionPipeline,
    "sd_img2img": StableDiffusionImg2ImgPipeline, "lcm": LatentConsistencyModelPipeline, "ldm": LDMPipeline,
}
def swap_scheduler(name, sched):
    """ldm-web --scheduler `name` (make_fixtures.make_sched) for the loaded pipeline's scheduler: as a user
    switches, Class.from_config(pipe.scheduler.config); the names used here imply no overrides (asserted)."""
    s = mf.make_sched(name, sched)
    plain = type(s).from_config(sched.config)
    assert dict(plain.config) == dict(s.config), f"{name}: make_sched adds overrides"
    return s


def load_base(model):
    """The case's pipeline components loaded as a user would (from_pretrained / from_single_file)."""
    if model == "sdxl.safetensors":
        return StableDiffusionXLPipeline.from_single_file(str(FIX / model), config=str(FIX / "sdxl"), local_files_only=True)
    if model == "sdxl-refiner.safetensors":
        return StableDiffusionXLImg2ImgPipeline.from_single_file(str(FIX / model), config=str(FIX / "sdxl-refiner"),
                                                                 local_files_only=True)
    folder = FIX / model
    cls = json.loads((folder / "model_index.json").read_text())["_class_name"]
    return getattr(diffusers, cls).from_pretrained(str(folder))


def make_pipe(kind, base, c):
    """The case's pipeline class around `base`'s components."""
    cls = PIPE_CLASS[kind]
    comps = dict(base.components)
    if kind == "xl_controlnet":
        comps["controlnet"] = ControlNetModel.from_pretrained(str(FIX / c["controlnet"])).eval()
    params = set(inspect.signature(cls.__init__).parameters)
    kw = {k: v for k, v in comps.items() if k in params}
    for k in ("safety_checker", "feature_extractor", "image_encoder"):
        if k in params:
            kw.setdefault(k, None)
    if "requires_safety_checker" in params:
        kw["requires_safety_checker"] = False
    if "add_watermarker" in params:
        kw["add_watermarker"] = False
    if "force_zeros_for_empty_prompt" in params:
        kw["force_zeros_for_empty_prompt"] = base.config.get("force_zeros_for_empty_prompt", True)
    if "requires_aesthetics_score" in params:
        kw["requires_aesthetics_score"] = base.config.get("requires_aesthetics_score", False)
    pipe = cls(**kw) if cls is not type(base) else base
    pipe.set_progress_bar_config(disable=True)
    return pipe


def xl_time_ids(kind, pipe, args, h, w, cfg_on, batch):
    """The effective SDXL micro-conditioning values and the add_time_ids rows diffusers builds from them,
    in the UNet batch order (see NOTES['sdxl'])."""
    g = lambda k, d: tuple(args[k]) if args.get(k) is not None else d  # noqa: E731
    e = {"original_size": g("original_size", (h, w)), "crops_coords_top_left": g("crops_coords_top_left", (0, 0)),
         "target_size": g("target_size", (h, w)), "negative_crops_coords_top_left": g("negative_crops_coords_top_left", (0, 0))}
    if kind in ("xl", "xl_controlnet", "xl_refine_base"):
        e["negative_original_size"] = g("negative_original_size", None)
        e["negative_target_size"] = g("negative_target_size", None)
        pos = list(e["original_size"] + e["crops_coords_top_left"] + e["target_size"])
        if e["negative_original_size"] is not None and e["negative_target_size"] is not None:
            neg = list(e["negative_original_size"] + e["negative_crops_coords_top_left"] + e["negative_target_size"])
        else:
            neg = pos
        rows = ([neg, pos] * batch) if cfg_on else [pos] * batch  # cat([neg, pos]) then .repeat(B, 1)
        e["requires_aesthetics_score"] = None
    else:
        e["negative_original_size"] = g("negative_original_size", e["original_size"])
        e["negative_target_size"] = g("negative_target_size", e["target_size"])
        e["aesthetic_score"] = args.get("aesthetic_score", 6.0)
        e["negative_aesthetic_score"] = args.get("negative_aesthetic_score", 2.5)
        e["requires_aesthetics_score"] = bool(pipe.config.requires_aesthetics_score)
        if e["requires_aesthetics_score"]:
            pos = list(e["original_size"] + e["crops_coords_top_left"] + (e["aesthetic_score"],))
            neg = list(e["negative_original_size"] + e["negative_crops_coords_top_left"] + (e["negative_aesthetic_score"],))
        else:  # diffusers uses the POSITIVE crops_coords_top_left in the negative row here
            pos = list(e["original_size"] + e["crops_coords_top_left"] + e["target_size"])
            neg = list(e["negative_original_size"] + e["crops_coords_top_left"] + e["negative_target_size"])
        rows = ([neg] * batch + [pos] * batch) if cfg_on else [pos] * batch  # repeat(B, 1), then cat
    e = {k: (list(v) if isinstance(v, tuple) else v) for k, v in e.items()}
    return e, [[float(x) for x in r] for r in rows]


def run_pipe(pipe, kwargs):
    """cond_fixtures.run_traced (every randn, UNet timesteps) + the UNet inputs of its first call."""
    cap = {}

    def hook(_m, args, kw):
        if cap:
            return
        ehs = kw.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if ehs is not None:
            cap["encoder_hidden_states"] = ehs.detach().clone()
        ack = kw.get("added_cond_kwargs")
        if ack:
            cap["add_text_embeds"] = ack["text_embeds"].detach().clone()
            cap["add_time_ids"] = ack["time_ids"].detach().clone()
        if kw.get("timestep_cond") is not None:
            cap["timestep_cond"] = kw["timestep_cond"].detach().clone()
        cap["unet_batch"] = int(args[0].shape[0])

    h = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out, draws, ts = cf.run_traced(pipe, kwargs)
    finally:
        h.remove()
    return out, draws, ts, cap


def json_args(kwargs):
    """The kwargs as recorded: PIL images by file name, tensors by shape."""
    out = {}
    for k, v in kwargs.items():
        if k == "generator":
            out[k] = "torch.Generator('cpu').manual_seed(seed)"
        elif isinstance(v, Image.Image):
            out[k] = f"images/{v.info.get('file', '?')} (PIL {v.mode} {v.size[0]}x{v.size[1]})"
        elif torch.is_tensor(v):
            out[k] = f"tensor {list(v.shape)} (in the case's safetensors)"
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def img(name):
    im = cf.load_img(name)
    im.info["file"] = name
    return im


def apply_mods(pipe, c, entry):
    """q4 UNet, LoRAs, embeddings, VAE swap and scheduler swaps, in that order, as a user would."""
    if c.get("q4"):
        entry["q4_weights"] = len(q4_unet(pipe.unet))
    if c.get("loras"):
        names = []
        for file, weight in c["loras"]:
            name = Path(file).stem
            msgs = load_lora(pipe, file, name)
            names.append(name)
            entry["loras"].append({"file": f"lora/{file}", "scale": weight, "adapter_name": name,
                                   "load_warnings": msgs})
        pipe.set_adapters(names, [w for _, w in c["loras"]])
        entry["lora_application"] = ("unfused: y = base(x) + weight * (alpha/r) * B(A(x)) per adapter; weights set with "
                                     "pipe.set_adapters(names, weights) (UNet and text encoders alike)")
    for file, token in c.get("embeddings", []):
        pipe.load_textual_inversion(str(EMB / file), token=token)
        entry["embeddings"].append({"file": f"embeddings/{file}", "token": token, "text_encoder": "text_encoder"})
    if c.get("embeddings_xl"):
        file, token = c["embeddings_xl"]
        sd = load_file(str(EMB / file))
        # the documented SDXL recipe: clip_g into text_encoder_2 / tokenizer_2, clip_l into text_encoder / tokenizer
        pipe.load_textual_inversion(sd["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        pipe.load_textual_inversion(sd["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        entry["embeddings"] = [{"file": f"embeddings/{file}", "key": "clip_g", "token": token, "text_encoder": "text_encoder_2"},
                               {"file": f"embeddings/{file}", "key": "clip_l", "token": token, "text_encoder": "text_encoder"}]
        for te, key in ((pipe.text_encoder, "clip_l"), (pipe.text_encoder_2, "clip_g")):
            rows = te.get_input_embeddings().weight[814:816]
            assert torch.equal(rows, sd[key]), key
    if c.get("vae") == "taesd":
        pipe.vae = AutoencoderTiny.from_pretrained(str(FIX / "taesd")).eval()
        entry["components"]["vae"] = "taesd (AutoencoderTiny), set as pipe.vae = ... after loading"
    if c.get("scheduler"):
        pipe.scheduler = swap_scheduler(c["scheduler"], pipe.scheduler)
        entry["scheduler_swap"] = (f"pipe.scheduler = {type(pipe.scheduler).__name__}.from_config(pipe.scheduler.config) "
                                   "after loading (no overrides; the pipeline's __init__ fix-ups do not run on it)")


def token_ids(pipe, prompt):
    out = {}
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is None or prompt is None:
            continue
        conv = pipe.maybe_convert_prompt(prompt, tok)
        out[name] = {"converted_prompt": conv,
                     "ids": tok(conv, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids}
    return out


def base_kwargs(kind, c, e):
    """The pipeline call's arguments (as passed) for the case's kind."""
    kw = {}
    if kind != "ldm":
        kw["prompt"] = e["prompt"]
        if e["prompt_2"] is not None:
            kw["prompt_2"] = e["prompt_2"]
        if e["negative_prompt"] is not None:
            kw["negative_prompt"] = e["negative_prompt"]
        kw["num_inference_steps"] = e["steps"]
        kw["guidance_scale"] = e["guidance"]
    if kind in ("xl", "sd", "lcm", "xl_controlnet", "xl_inpaint") and e["width"] is not None:
        kw["height"], kw["width"] = e["height"], e["width"]
    if kind != "ldm" and e["batch"] != 1:
        kw["num_images_per_prompt"] = e["batch"]
    if kind in ("xl_img2img", "xl_inpaint", "sd_img2img"):
        kw["image"] = img(c["image"])
        if c.get("strength") is not None:
            kw["strength"] = c["strength"]
    if kind == "xl_inpaint":
        kw["mask_image"] = img(c["mask"])
    if kind == "xl_controlnet":
        kw["image"] = img(c["control"])
        kw["controlnet_conditioning_scale"] = c["scale"]
    if kind == "ldm":
        kw.update(batch_size=e["batch"], num_inference_steps=e["steps"], eta=c["eta"])
    kw.update(c.get("xl", {}))
    return kw


def new_entry(idx, c):
    kind = c["kind"]
    seed = c.get("seed", 2000 + c.get("seed_of", idx))
    # sizes: text-to-image 64x64 unless given; inpainting at the images' 96x64; img2img / LDM: from the output
    dw, dh = {"xl": (64, 64), "sd": (64, 64), "lcm": (64, 64), "xl_controlnet": (W, H), "xl_inpaint": (W, H),
              "xl_refine": (64, 64)}.get(kind, (None, None))
    c = {"width": dw, "height": dh, **{k: v for k, v in c.items() if v is not None or k not in ("width", "height")}}
    return {
        "index": idx, "kind": kind, "pipeline": PIPE_CLASS[kind].__name__, "model": c["model"], "components": {},
        "unet_in_channels": None, "scheduler": c.get("scheduler"), "scheduler_swap": None, "scheduler_class": None,
        "scheduler_config": None,
        "prompt": None if kind == "ldm" else c.get("prompt", ASTRO), "prompt_2": c.get("prompt_2"),
        "negative_prompt": c.get("negative_prompt"), "negative_prompt_2": c.get("negative_prompt_2"),
        "seed": seed, "generator": "torch.Generator('cpu').manual_seed(seed), a new one for every pipeline call",
        "steps": c["steps"], "guidance": c.get("guidance", 7.5), "width": c.get("width"), "height": c.get("height"),
        "batch": c.get("batch", 1), "eta": c.get("eta", 0.0), "strength": c.get("strength"), "image": c.get("image"),
        "mask": c.get("mask"), "controlnet": None, "sdxl": None, "loras": [], "embeddings": [], "token_ids": None,
        "lora_application": None, "q4_weights": None, "a1111": None, "force_zeros_for_empty_prompt": None,
        "args": None, "stages": None, "scheduler_timesteps": None, "timesteps": None, "generator_draws": None,
        "unet_batch": None, "checks": {}, "notes": [],
    }


def record_run(e, sched, draws, ts, cap):
    e["scheduler_timesteps"] = [float(t) for t in sched.timesteps] if sched.timesteps is not None else None
    e["timesteps"] = ts
    e["generator_draws"] = cf.collapse([{k: v for k, v in d.items() if k != "generator"} for d in draws])
    e["unet_batch"] = cap.get("unet_batch")


def run_case(idx, c, results):
    kind = c["kind"]
    if c.get("same_as") is not None:
        c = {**CASES[c["same_as"]], "model": c["model"], "seed": 2000 + c["same_as"], "same_as": c["same_as"]}
    e = new_entry(idx, c)
    tensors = {}
    base = load_base(c["model"])
    if kind == "ldm":
        e["prompt"] = None
        e["guidance"] = None
    pipe = make_pipe(kind if kind != "xl_refine" else "xl", base, c)
    apply_mods(pipe, c, e)
    e["unet_in_channels"] = pipe.unet.config.in_channels
    if kind == "ldm":
        pipe.unet.register_to_config(sample_size=c["sample_size"])
        e["notes"].append(f"pipe.unet.register_to_config(sample_size={c['sample_size']}) before the call (the folder has "
                          "8); LDMPipeline draws latents [B, C, sample_size, sample_size]. torch.manual_seed(seed) is set "
                          "too (LDMPipeline does not pass its generator to scheduler.step; eta 0 draws nothing there)")
    kw = base_kwargs(kind, c, e)

    if kind == "xl_refine":
        # stage 1: the base to denoising_end, latents out; stage 2: the refiner from denoising_start
        bkw = dict(kw, denoising_end=c["denoising"], output_type="latent", generator=mf.gen(e["seed"]))
        out, draws, ts, cap = run_pipe(pipe, bkw)
        base_lat = out.images
        st1 = {"pipeline": "StableDiffusionXLPipeline", "model": c["model"], "args": json_args(bkw)}
        record_run(st1, pipe.scheduler, draws, ts, cap)
        sx, rows = xl_time_ids("xl_refine_base", pipe, c.get("xl", {}), e["height"], e["width"], pipe.do_classifier_free_guidance, e["batch"])
        assert cap["add_time_ids"].tolist() == rows, (cap["add_time_ids"].tolist(), rows)
        st1["sdxl"] = dict(sx, denoising_end=c["denoising"], time_ids_rows=rows)
        st1["force_zeros_for_empty_prompt"] = pipe.config.force_zeros_for_empty_prompt
        tensors["base_latents"] = base_lat
        for k in ("encoder_hidden_states", "add_text_embeds", "add_time_ids"):
            tensors["base_" + k] = cap[k]
        refiner = load_base(c["refiner"])
        rp = make_pipe("xl_img2img", refiner, c)
        rkw = {"prompt": e["prompt"], "image": base_lat, "denoising_start": c["denoising"],
               "num_inference_steps": e["steps"], "guidance_scale": e["guidance"], "generator": mf.gen(e["seed"]),
               "output_type": "np"}
        out, draws, ts, cap = run_pipe(rp, rkw)
        st2 = {"pipeline": "StableDiffusionXLImg2ImgPipeline", "model": c["refiner"], "args": json_args(rkw)}
        record_run(st2, rp.scheduler, draws, ts, cap)
        sx, rows = xl_time_ids("xl_img2img", rp, {}, e["height"], e["width"], rp.do_classifier_free_guidance, e["batch"])
        assert cap["add_time_ids"].tolist() == rows, (cap["add_time_ids"].tolist(), rows)
        st2["sdxl"] = dict(sx, denoising_start=c["denoising"], strength="ignored (denoising_start given)", time_ids_rows=rows)
        st2["force_zeros_for_empty_prompt"] = rp.config.force_zeros_for_empty_prompt
        e["stages"] = [st1, st2]  # (args, timesteps, draws of each call; the top-level ones stay null)
        e["components"] = {"refiner": c["refiner"]}
        e["notes"].append("two pipeline calls, each with its own torch.Generator('cpu').manual_seed(seed) (same seed); "
                          "the base returns latents (output_type='latent', not divided by the scaling factor) that the "
                          "refiner takes as image= (4 channels: used as latents as they are, no VAE encode, no noise "
                          "added since denoising_start is set)")
        image = out.images
        e["scheduler_class"] = type(rp.scheduler).__name__
        e["scheduler_config"] = cf.sched_config(rp.scheduler)
        for k in ("encoder_hidden_states", "add_text_embeds", "add_time_ids"):
            tensors[k] = cap[k]
    else:
        if c.get("a1111"):
            pos, neg = c["a1111"]
            enc = [(pipe.tokenizer, pipe.text_encoder, "last")]
            pe, _, pinfo = a1111_embeddings(enc, pos)
            ne, _, ninfo = a1111_embeddings(enc, neg)
            assert pe.shape == ne.shape == (1, 77, mf.HIDDEN)
            kw.pop("prompt")
            kw["prompt_embeds"], kw["negative_prompt_embeds"] = pe, ne
            tensors["prompt_embeds"], tensors["negative_prompt_embeds"] = pe, ne
            e["prompt"], e["negative_prompt"] = None, None
            e["a1111"] = {"prompt": pos, "negative_prompt": neg, "prompt_info": pinfo[0], "negative_info": ninfo[0]}
        if kind == "ldm":
            torch.manual_seed(e["seed"])
        full = dict(kw, generator=mf.gen(e["seed"]), output_type="np")
        out, draws, ts, cap = run_pipe(pipe, full)
        image = out.images
        e["args"] = json_args(full)
        record_run(e, pipe.scheduler, draws, ts, cap)
        e["scheduler_class"] = type(pipe.scheduler).__name__
        e["scheduler_config"] = cf.sched_config(pipe.scheduler)
        if kind.startswith("xl"):
            cfg_on = pipe.do_classifier_free_guidance
            sx, rows = xl_time_ids(kind, pipe, c.get("xl", {}), *image.shape[1:3], cfg_on, e["batch"])
            assert cap["add_time_ids"].tolist() == rows, (idx, cap["add_time_ids"].tolist(), rows)
            sx["time_ids_rows"] = rows
            if cfg_on and e["batch"] > 1 and kind in ("xl", "xl_controlnet") and rows[0] != rows[1]:
                e["notes"].append("add_time_ids rows are interleaved [neg, pos, neg, pos] while the text embeddings are "
                                  "[neg, neg, pos, pos] (cat then repeat): UNet rows 1 and 2 get the other branch's time ids")
            if kind in ("xl_img2img", "xl_inpaint"):
                sx["strength"] = c.get("strength", 0.3 if kind == "xl_img2img" else 0.9999)
                sx["denoising_start"] = sx["denoising_end"] = None
            e["sdxl"] = sx
            e["force_zeros_for_empty_prompt"] = pipe.config.get("force_zeros_for_empty_prompt")
        if kind in ("xl", "xl_img2img", "xl_inpaint", "xl_controlnet") or c.get("loras") or c.get("embeddings") or c.get("a1111"):
            for k in ("encoder_hidden_states", "add_text_embeds", "add_time_ids"):
                if k in cap:
                    tensors[k] = cap[k]
        if "timestep_cond" in cap:
            tensors["timestep_cond"] = cap["timestep_cond"]
            e["notes"].append("timestep_cond = get_guidance_scale_embedding((guidance - 1) * 1000, 16) (the UNet's "
                              "time_cond_proj_dim); no CFG batch; the image is the VAE decode of the scheduler's "
                              "`denoised` (x0 prediction) of the last step, not of `latents`")
        if c.get("embeddings") or c.get("embeddings_xl"):
            e["token_ids"] = {"prompt": token_ids(pipe, e["prompt"]), "negative_prompt": token_ids(pipe, e["negative_prompt"])}
            e["token_ids"]["added_tokens"] = {t: i for t, i in sorted(pipe.tokenizer.added_tokens_encoder.items())
                                              if i >= 814}
            if c.get("embeddings_xl"):
                ids2 = e["token_ids"]["prompt"]["tokenizer_2"]["ids"]
                e["token_ids"]["text_encoder_2_pooled_position"] = int(np.argmax(ids2))
                e["notes"].append("text_encoder_2 has the legacy eos_token_id 2, so transformers pools at argmax(input_ids): "
                                  f"position {int(np.argmax(ids2))}, the last added <pair> token (id {max(ids2)}), not the "
                                  f"<|endoftext|> at position {ids2.index(813)}")
        if kind == "xl_controlnet":
            e["controlnet"] = {"folder": c["controlnet"], "image": c["control"], "scale": c["scale"], "guess_mode": False,
                               "control_guidance_start": 0.0, "control_guidance_end": 1.0}
        if kind == "ldm":
            e["width"], e["height"] = int(image.shape[2]), int(image.shape[1])
            e["batch"] = 1
        if e["width"] is None:
            e["height"], e["width"] = int(image.shape[1]), int(image.shape[2])

    image = torch.from_numpy(image).float()
    assert list(image.shape) == [e["batch"], e["height"], e["width"], 3], (idx, image.shape)
    e["image_shape"] = list(image.shape)
    e["saturated_fraction"] = round(cf.check_image(f"case {idx}", image), 4)
    tensors = {"image": image, **tensors}
    post_checks(idx, c, e, image, results)
    e["tensors"] = sorted(tensors)
    mf.stats(f"case {idx} {kind} {c['model']} {c.get('scheduler') or ''}", image)
    mf.save_tensors(REF / f"family_{idx}.safetensors", tensors)
    results[idx] = image
    return e


def image_without(c, drop):
    """The case re-run with some modifications removed (for the "does it matter" checks)."""
    c2 = {k: v for k, v in c.items() if k not in drop}
    base = load_base(c2["model"])
    pipe = make_pipe(c2["kind"], base, c2)
    apply_mods(pipe, c2, new_entry(-1, c2))
    kw = base_kwargs(c2["kind"], c2, new_entry(-1, c2))
    seed = c.get("seed", 2000 + c.get("seed_of", c["_idx"]))
    with torch.no_grad():
        return torch.from_numpy(pipe(**kw, generator=mf.gen(seed), output_type="np").images).float()


def post_checks(idx, c, e, image, results):
    c = dict(c, _idx=idx)
    if c.get("same_as") is not None:
        ref = results[c["same_as"]]
        d = (image - ref).abs().max().item()
        e["checks"]["max_abs_diff_vs_case"] = {"case": c["same_as"], "value": d}
        e["notes"].append(f"the pipeline from the single file, with case {c['same_as']}'s settings and seed: the same image")
        assert d == 0.0, f"case {idx}: single file differs from the folder by {d}"
        print(f"    == case {c['same_as']} (max |diff| {d})")
    if c.get("loras"):
        plain = image_without(c, ("loras",))
        d = (image - plain).abs().mean().item()
        e["checks"]["mean_abs_diff_vs_no_lora"] = round(d, 5)
        print(f"    vs no LoRA: mean |diff| {d:.4f}")
        assert d > 0.01, (idx, d)
    if c.get("q4"):
        d = (image - results[c["seed_of"]]).abs()
        e["checks"]["vs_case_14_f32"] = {"case": c["seed_of"], "max_abs_diff": round(d.max().item(), 5),
                                         "mean_abs_diff": round(d.mean().item(), 5)}
        print(f"    q4 vs f32 (case {c['seed_of']}): mean |diff| {d.mean():.4f} max {d.max():.4f}")
    if c.get("kind") == "xl_controlnet":
        plain = image_without({**c, "kind": "xl"}, ("controlnet",))
        d = (image - plain).abs().max().item()
        e["checks"]["max_abs_diff_vs_no_controlnet"] = round(d, 5)
        print(f"    vs no ControlNet: max |diff| {d:.3f}")
        assert d > 0.02
    if c.get("vae") == "taesd":
        plain = image_without(c, ("vae",))
        d = (image - plain).abs().mean().item()
        e["checks"]["mean_abs_diff_vs_kl_vae"] = round(d, 5)
        print(f"    vs the KL VAE: mean |diff| {d:.4f}")
    if c.get("embeddings") or c.get("embeddings_xl"):
        kw_prompt = e["prompt"]
        plain_c = {**c, "prompt": kw_prompt.replace("<cat-toy>", "cat").replace("<pair>", "cat")}
        plain_c.pop("embeddings", None)
        plain_c.pop("embeddings_xl", None)
        plain = image_without(plain_c, ())
        d = (image - plain).abs().mean().item()
        e["checks"]["mean_abs_diff_vs_plain_word"] = round(d, 5)
        print(f"    vs the plain word 'cat': mean |diff| {d:.4f}")
        assert d > 0.005


# --------------------------------------------------------------------------------------------
# notes for the Rust side (read from the diffusers 0.42.1 / transformers 5.24 / peft 0.21.2 source and
# confirmed by the recorded UNet inputs of each case)
# --------------------------------------------------------------------------------------------

NOTES = {
    "source": f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}. Every "
              "case: `args` = the keyword arguments of the pipeline call exactly as passed (images by file name); "
              "`generator_draws` = every torch.randn during the call in order (shape, diffusers call chain; equal "
              "consecutive draws collapsed with `count`); `timesteps` = the timestep of each UNet call; "
              "`scheduler_timesteps` = scheduler.timesteps after the run; `tensors` = the keys of "
              "ref/family_{index}.safetensors (`image` float32 [B,H,W,3] in [0,1] = output_type='np'; "
              "`encoder_hidden_states` / `add_text_embeds` / `add_time_ids` / `timestep_cond` = the UNet's inputs "
              "at its FIRST call, CFG batch included).",
    "sdxl": [
        "encode_prompt: for each (tokenizer, text encoder) of [(tokenizer, text_encoder), (tokenizer_2, text_encoder_2)] "
        "(only the second for the refiner): ids padded to 77 (tokenizer pads with <|endoftext|> 813, tokenizer_2 with '!' 0), "
        "z = hidden_states[-2] (penultimate layer output, NO final LayerNorm, for both); prompt_embeds = cat(z1, z2, -1) "
        "[B,77,80] (refiner: z2 alone, [B,77,48]); pooled = text_encoder_2's text_embeds (final LayerNorm, then "
        "text_projection, at the pooled position).",
        "prompt_2 defaults to prompt and goes to tokenizer_2 / text_encoder_2; negative_prompt_2 defaults to negative_prompt.",
        "text_encoder_2 pooled position: its config has the legacy eos_token_id 2 (as the real SDXL one), so transformers "
        "pools at argmax(input_ids) = the first <|endoftext|> (813 is the largest id) - unless added (textual inversion) "
        "tokens with larger ids are present (case 21).",
        "force_zeros_for_empty_prompt (sdxl, sdxl-inpaint, sdxl-turbo: true; the refiner: false): with CFG and "
        "negative_prompt None, the negative embeddings AND the negative pooled embeddings are zeros (no encoder run); with "
        "force_zeros false, the empty string is encoded.",
        "CFG iff guidance_scale > 1 (turbo cases: guidance 0: no negative branch, UNet batch B).",
        "Added conditioning: UNet added_cond_kwargs = {text_embeds: pooled [2B,40], time_ids [2B,n]}; time embedding "
        "input = cat(pooled, flatten(sinusoidal_embedding(time_ids, 8))) (add_time_proj: Timesteps(8, flip_sin_to_cos, "
        "freq_shift 0) per id) -> add_embedding (Linear, SiLU, Linear) added to the timestep embedding.",
        "StableDiffusionXLPipeline / ControlNet-XL time ids: pos = original_size + crops_coords_top_left + target_size "
        "(defaults (height, width), (0, 0), (height, width)); neg = negative_original_size + negative_crops_coords_top_left "
        "+ negative_target_size ONLY if both negative_original_size and negative_target_size are given, else = pos. "
        "The batch is built as cat([neg, pos]) and THEN .repeat(B, 1): rows [neg, pos, neg, pos, ...] while the "
        "embeddings are [neg x B, pos x B] - with batch 2 and distinct negative sizes (case 1) UNet row 1 (an "
        "unconditional sample) gets the positive time ids and row 2 the negative ones. `sdxl.time_ids_rows` lists "
        "the rows in UNet batch order (asserted equal to the UNet's input).",
        "Img2img / inpaint time ids: with requires_aesthetics_score (the refiner): pos = original_size + crops + "
        "(aesthetic_score,) (default 6.0), neg = negative_original_size + negative_crops + (negative_aesthetic_score,) "
        "(default 2.5); without it: pos = original_size + crops + target_size, neg = negative_original_size + crops "
        "(the POSITIVE crops_coords_top_left: diffusers ignores negative_crops_coords_top_left here) + negative_target_size; "
        "negative sizes default to the positive ones; sizes default to the latents' size * 8; rows [neg x B, pos x B] "
        "(repeat first, then cat: aligned with the embeddings).",
        "denoising_end (base): cutoff = int(round(1000 - denoising_end*1000)); the timesteps >= cutoff are run, the rest "
        "dropped (case 2: 5 Euler steps [801, 601, 401, 201, 1] -> runs 801..201). denoising_start (img2img): "
        "n = count(scheduler.timesteps < cutoff) (+1 for 2nd-order schedulers when even), t_start = len - n, "
        "set_begin_index(t_start), and NO noise is added to the given latents (strength ignored): case 2's refiner runs "
        "[1] only.",
        "img2img strength: init_timestep = min(int(steps * strength), steps); t_start = steps - init_timestep (refiner "
        "default strength 0.3: 5 steps -> 1 step). XL inpaint's default strength is 0.9999: int(5 * 0.9999) = 4 of 5 "
        "steps, and since strength != 1 the start latents are add_noise(image_latents, noise, t0) (not pure noise).",
        "VAE: scaling_factor 0.13025; force_upcast only matters for float16 VAEs (all f32 here). output_type='latent' "
        "returns the latents as they are (not divided by the scaling factor).",
    ],
    "inpaint_xl": [
        "Draws: 1. vae.encode(image) sample [1,4,h,w] if the UNet has 4 channels or strength < 1; 2. noise [B,4,h,w]; "
        "3. ALWAYS vae.encode(masked_image) sample [1,4,h,w]; 4. scheduler draws - as StableDiffusionInpaintPipeline "
        "(see cond_cases.json notes).",
        "mask: binarised (>= 0.5), masked_image = image * (mask < 0.5); mask to latent size by nearest interpolation; "
        "9-channel UNet input = cat(latents, mask, masked_image_latents); 4-channel: after each step latents = "
        "(1 - mask) * add_noise(image_latents, noise, t_next) + mask * latents (clean image latents after the last step).",
    ],
    "controlnet_xl": [
        "The ControlNet (from_unet of the sdxl UNet: text_time added embedding too) gets the same latent_model_input, t, "
        "prompt_embeds and added_cond_kwargs (text_embeds, time_ids) as the UNet; residuals * controlnet_conditioning_scale; "
        "control image: resize to (width, height) if needed, RGB, /255 ([0,1], not [-1,1]), repeated for the batch, "
        "cat([x]*2) for CFG. Draws: latents [B,4,h,w] * init_noise_sigma, then the scheduler's.",
    ],
    "lcm": [
        "LatentConsistencyModelPipeline: no CFG whatever the guidance; w = guidance - 1, timestep_cond = "
        "get_guidance_scale_embedding(w) (w * 1000, half = 8: exp(-log(10000) * arange(8) / 7), cat(sin, cos)) [B,16] "
        "into the UNet's time_embedding.cond_proj (Linear 16 -> 16, no bias), added to the timestep sinusoid before "
        "time_embedding.linear_1.",
        "LCMScheduler timesteps (original_inference_steps 50, leading, steps_offset ignored): 4 steps -> [999, 759, 499, "
        "259], 2 steps -> [999, 499]; each step: denoised = c_out * x0_pred + c_skip * sample (timestep_scaling 10), "
        "then latents = sqrt(acp_prev) * denoised + sqrt(1 - acp_prev) * randn (a draw on every step but the last).",
        "The returned image decodes `denoised` (the last step's x0 estimate), not `latents`.",
    ],
    "turbo": [
        "sdxl-turbo / sd-turbo: EulerAncestralDiscreteScheduler, timestep_spacing 'trailing': timesteps = "
        "round(arange(1000, 0, -1000/steps)) - 1 (1 step: [999]; 2: [999, 499]; 4: [999, 749, 499, 249]); sigmas "
        "interpolated at those, last sigma 0; init_noise_sigma = sigma_max for 'trailing' (not sqrt(sigma_max^2 + 1) as for 'leading'). guidance 0: no CFG. "
        "Euler a draws randn every step (also the last). sd-turbo keeps sd2's v_prediction.",
        "sd-turbo img2img (StableDiffusionImg2ImgPipeline), strength 0.5 of 2 steps: int(2 * 0.5) = 1 step: [499] "
        "(set_begin_index(1), noise added at sigma(499)).",
    ],
    "lora": [
        "Formats: kohya / A1111 (lora_unet_* / lora_te_* / lora_te1_* / lora_te2_* with .lora_down.weight, .lora_up.weight, "
        ".alpha) and diffusers/PEFT (unet.<module>.lora_A.weight / lora_B.weight, text_encoder.<module>..., optional "
        "safetensors metadata 'lora_adapter_metadata' = JSON of the LoraConfig per component, keys 'unet.r', "
        "'unet.lora_alpha', 'text_encoder.r', ...).",
        "Effective update (unfused, PEFT's forward): y = base(x) + sum over active adapters of weight * (alpha / r) * "
        "B(A(x)); Linear: A [r, in], B [out, r]; Conv2d (LoCon): A = a conv with the base layer's kernel, stride and "
        "padding [r, in, k, k], B = 1x1 conv [out, r, 1, 1]. `weight` = the set_adapters weight (default 1.0), applied "
        "to the UNet and the text encoders alike. The per-module (rank, file alpha, scaling) diffusers loaded is in "
        "`loras` (asserted: alpha / rank with a file alpha, 1.0 without).",
        "kohya SD1 keys are the diffusers module path with '.' -> '_' (lora_unet_down_blocks_0_attentions_0_"
        "transformer_blocks_0_attn1_to_q); text encoder lora_te_text_model_encoder_layers_N_... (the transformers < 5.6 "
        "names; diffusers strips text_model. for the flattened 5.x CLIPTextModel).",
        "kohya SDXL keys use the SGM UNet's module names (input_blocks_I_J_..., middle_block_J_..., output_blocks_I_J_...; "
        "resnet parts in_layers_2 = conv1, out_layers_3 = conv2, emb_layers_1 = time_emb_proj, skip_connection = "
        "conv_shortcut; downsampler input_blocks_I_0_op; upsampler output_blocks_I_2_conv after an attention level); "
        "diffusers maps them with _maybe_map_sgm_blocks_to_diffusers(layers_per_block=2) + _convert_unet_lora_key.",
        "diffusers quirks with kohya alphas (found here, avoided in the fixture files): (1) a module WITHOUT .alpha gets "
        "the most common alpha of the file, not its rank (kohya / A1111 / ComfyUI: no alpha => scale 1); (2) with several "
        "distinct alpha values, the per-module alpha_pattern keys diffusers derives do not match attention projections "
        "('...attn1.processor.to_q_lora.down.weight') nor text-encoder modules ('text_model.' prefix vs the flattened "
        "CLIPTextModel), so those get the most common alpha. The fixture files therefore use ONE alpha value (2.0) and "
        "leave .alpha out only on rank-2 modules (conv_shortcut, time_emb_proj, mlp.fc2), where both readings give "
        "scale 1.",
        "PEFT file without lora_adapter_metadata (sd1-lcm-peft): lora_alpha = r (scale 1). With metadata (sd1-peft): "
        "the LoraConfig in it (r 4, lora_alpha 6: scale 1.5).",
        "q4 case (19): every UNet Linear/Conv2d weight with row length >= 32 replaced by its q4_0 round trip (ldm-web's "
        "encode_q4_0/decode_q4_0), the LoRA layers applied unfused on top in f32.",
    ],
    "textual_inversion": [
        "load_textual_inversion: a multi-vector embedding [n, C] adds tokens '<tok>', '<tok>_1', ..., '<tok>_{n-1}' "
        "(ids 814, 815, ...: appended to the tokenizer; the text encoder's token_embedding resized and the rows set); "
        "maybe_convert_prompt replaces each occurrence of '<tok>' in the prompt with '<tok> <tok>_1 ...' before "
        "tokenizing (case 20: negative prompt too). A1111 .safetensors {'emb_params': [n, C]}: the single key is taken as "
        "the token unless token= is given; A1111 .pt: token = its 'name', embedding = string_to_param['*'].",
        "SDXL: the clip_l rows go to tokenizer / text_encoder and the clip_g rows to tokenizer_2 / text_encoder_2 under the "
        "same token (two load_textual_inversion calls).",
    ],
    "taesd": [
        "AutoencoderTiny decode: x = tanh(latents / 3) * 3 -> DecoderTiny layers -> * 2 - 1 (so [-1, 1] like the KL "
        "VAE); the pipeline divides by scaling_factor 1.0 first. encode: EncoderTiny on (image + 1) / 2, returns the "
        "raw latents (no sampling, no scaling). pipe.vae = AutoencoderTiny(...) after loading keeps the pipeline's "
        "vae_scale_factor (8).",
    ],
    "schedulers": [
        "Every swap (`scheduler` = an ldm-web --scheduler name) is done as a user does it, after loading: "
        "pipe.scheduler = X.from_config(pipe.scheduler.config), no overrides. The pipeline's __init__ fix-ups never run "
        "on it, so DDIM / DDPM from sd1's PNDM config (cases 23 / 24) keep their default clip_sample=True (x0 clipped to "
        "[-1, 1], clip_sample_range 1.0); keys the config lacks take the new class's defaults, keys it has that the class "
        "does not know stay in the config unused. DDPM: variance_type fixed_small, a draw for every t > 0.",
    ],
    "ldm": [
        "LDMPipeline: latents randn [B, in_channels, sample_size, sample_size] from the generator (sample_size read from "
        "unet.config at call time), no init_noise_sigma scaling for DDIM (1.0), scheduler.step(..., eta) without the "
        "generator, decode with the VQ-VAE (quantised), then (x / 2 + 0.5).clamp(0, 1).",
    ],
    "prompt_weighting": [
        "a1111_embeddings() in scripts/family_fixtures.py: AUTOMATIC1111's parse_prompt_attention (regex with "
        ":\\s*([+-]?[.\\d]+)\\s*\\) weights, (x) x1.1, [x] /1.1, escapes, unbalanced brackets closed at the end, BREAK, "
        "equal-weight runs merged), tokenize_line (per-segment tokenisation without special tokens, 75-token chunks, "
        "comma back-track 20, BREAK), process_tokens (pad id after the first eos when pad != eos), emphasis 'Original' "
        "(z * mult, then * (mean_before / mean_after), each encoder separately for SDXL), chunks concatenated; SDXL "
        "pooled = text_encoder_2's text_embeds of the first chunk. The plain prompt equals diffusers' encode_prompt "
        "bit for bit (asserted, SD1 and SDXL).",
    ],
}


# --------------------------------------------------------------------------------------------
# extra references
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def taesd_ref():
    vae = AutoencoderTiny.from_pretrained(str(FIX / "taesd")).eval()
    lat = torch.randn(1, 4, 8, 12, generator=mf.gen(7))
    dec = vae.decode(lat).sample
    image = diffusers.image_processor.VaeImageProcessor().preprocess(cf.load_img("init.png"))
    enc = vae.encode(image).latents
    cf.check_image("taesd decoded", (dec * 0.5 + 0.5).clamp(0, 1))
    assert enc.std() > 0.02
    mf.stats("taesd decoded", dec)
    mf.stats("taesd encoded", enc)
    mf.save_tensors(REF / "family_taesd.safetensors", {"latents": lat, "decoded": dec, "image": image, "encoded": enc})
    return {"latents": "randn [1,4,8,12], torch.Generator('cpu').manual_seed(7)",
            "decoded": "AutoencoderTiny.decode(latents).sample [1,3,64,96] (in [-1,1] convention, not clamped)",
            "image": "images/init.png through VaeImageProcessor().preprocess: [1,3,64,96] in [-1,1]",
            "encoded": "AutoencoderTiny.encode(image).latents [1,4,8,12]"}


def q4_ref():
    q4_selftest()
    unet = UNet2DConditionModel.from_pretrained(str(FIX / "sd1" / "unet"))
    orig = {k: v.clone() for k, v in unet.state_dict().items()}
    names = q4_unet(unet)
    # to_q [32, 32]: one whole block per row; conv1 [16, 16, 3, 3]: 144 = 4 blocks + 16 padded; conv_in [16, 4, 3, 3]: 36
    keys = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", "down_blocks.0.resnets.0.conv1.weight",
            "conv_in.weight"]
    sd = unet.state_dict()
    assert all(k in names for k in keys)
    mf.save_tensors(REF / "family_q4_check.safetensors", {k: sd[k] for k in keys})
    untouched = sorted(f"{n}.weight" for n, m in unet.named_modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and f"{n}.weight" not in names)
    err = max((sd[k] - orig[k]).abs().max().item() for k in names)
    print(f"q4: {len(names)} UNet weights replaced by their q4_0 round trip (max |change| {err:.4f}); "
          f"{len(untouched)} Linear/Conv2d weights with rows < 32 untouched")
    return {"rule": "every nn.Linear / nn.Conv2d weight of the UNet whose row length prod(shape[1:]) >= 32 (ldm-web's "
                    "loader::quantisable), rows cut in blocks of 32 (last zero-padded), see q4_0_dequant()",
            "replaced": len(names), "untouched_linear_conv_weights": untouched, "check_file": "ref/family_q4_check.safetensors",
            "check_keys": keys}


def prompt_weighting_ref(p1, px):
    sd1_prompts = ["a photo of an astronaut riding a horse on mars", "(red:1.3) apple, [blue] sky",
                   "((nested)) and (a:0.5) (b)", "\\(not weighted\\) and \\[x\\]", "(open and [close", "a BREAK b",
                   long_comma_prompt(p1.tokenizer), ""]
    xl_prompts = ["a photo of an astronaut riding a horse on mars", "(red:1.3) apple, [blue] sky", "a BREAK (b:1.2)"]
    tensors, doc = {}, {"sd1": [], "sdxl": []}
    enc1 = [(p1.tokenizer, p1.text_encoder, "last")]
    for k, pr in enumerate(sd1_prompts):
        z, _, info = a1111_embeddings(enc1, pr)
        tensors[f"sd1_{k}"] = z
        row = {"key": f"sd1_{k}", "prompt": pr, **info[0], "shape": list(z.shape)}
        if k in (0, 7):
            emb, _ = p1.encode_prompt(pr, "cpu", 1, False)
            assert torch.equal(emb, z), f"A1111 plain prompt {k} != diffusers encode_prompt"
            row["equals_diffusers_encode_prompt"] = True
        if k == 6:
            assert info[0]["backtracked"] and len(info[0]["chunks"]) == 2
        doc["sd1"].append(row)
    encx = [(px.tokenizer, px.text_encoder, "penultimate"), (px.tokenizer_2, px.text_encoder_2, "penultimate")]
    for k, pr in enumerate(xl_prompts):
        z, pooled, info = a1111_embeddings(encx, pr)
        tensors[f"sdxl_{k}"], tensors[f"sdxl_pooled_{k}"] = z, pooled
        row = {"key": f"sdxl_{k}", "pooled_key": f"sdxl_pooled_{k}", "prompt": pr, "shape": list(z.shape),
               "encoders": [dict(info[0], encoder="text_encoder (hidden_states[-2])"),
                            dict(info[1], encoder="text_encoder_2 (hidden_states[-2]; pooled: text_embeds of chunk 0)")]}
        if k == 0:
            pe, _, pp, _ = px.encode_prompt(pr, do_classifier_free_guidance=False)
            assert torch.equal(pe, z) and torch.equal(pp, pooled), "A1111 SDXL plain prompt != diffusers encode_prompt"
            row["equals_diffusers_encode_prompt"] = True
        doc["sdxl"].append(row)
    mf.save_tensors(REF / "family_prompt_weighting.safetensors", tensors)
    print(f"prompt weighting: {len(sd1_prompts)} sd1 + {len(xl_prompts)} sdxl prompts")
    return doc


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def compact_json(o, ind=0):
    """Indented JSON with every list of scalars on one line (token ids, timesteps, shapes)."""
    pad, pad1 = " " * ind, " " * (ind + 1)
    scalar = lambda x: x is None or isinstance(x, (bool, int, float, str))  # noqa: E731
    if isinstance(o, dict):
        if not o:
            return "{}"
        items = [f"{pad1}{json.dumps(k, ensure_ascii=False)}: {compact_json(v, ind + 1)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(o, (list, tuple)):
        if all(scalar(x) for x in o):
            return json.dumps(list(o), ensure_ascii=False, allow_nan=False)
        return "[\n" + ",\n".join(pad1 + compact_json(x, ind + 1) for x in o) + "\n" + pad + "]"
    return json.dumps(o, ensure_ascii=False, allow_nan=False)


def clean():
    for d in OUTPUT_DIRS:
        if (FIX / d).exists():
            shutil.rmtree(FIX / d)
    for f in OUTPUT_FILES:
        (FIX / f).unlink(missing_ok=True)
    for f in sorted(REF.glob(REF_GLOB)):
        f.unlink()
    for d in ("lora", "embeddings", "bad"):
        (FIX / d).mkdir(parents=True)


def outputs():
    """Every file this script writes."""
    files = [FIX / f for f in OUTPUT_FILES] + sorted(REF.glob(REF_GLOB))
    for d in OUTPUT_DIRS:
        files += sorted(p for p in (FIX / d).rglob("*") if p.is_file())
    return files


def configs():
    out = {}
    for folder in ("sdxl", "sdxl-refiner", "sdxl-inpaint", "sdxl-turbo", "sd-turbo", "lcm"):
        f = FIX / folder
        out[folder] = {"model_index": json.loads((f / "model_index.json").read_text())}
        for comp in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
            cfgf = f / comp / ("scheduler_config.json" if comp == "scheduler" else "config.json")
            if cfgf.exists():
                out[folder][comp] = json.loads(cfgf.read_text())
    for folder in ("controlnet-xl", "taesd"):
        out[folder] = json.loads((FIX / folder / "config.json").read_text())
    return mf.json_safe(out)


def main():
    t0 = time.time()
    clean()
    print("models")
    build_sdxl()
    build_refiner()
    build_sdxl_inpaint()
    build_turbos()
    build_lcm()
    build_controlnet_xl()
    build_taesd()

    print("single files")
    for name, folder, refiner in (("sdxl", FIX / "sdxl", False), ("sdxl-refiner", FIX / "sdxl-refiner", True)):
        verify_sgm_file(write_sgm_file(name, folder, refiner), folder, refiner)

    print("LoRA files")
    fresh = lambda m: load_base(m)  # noqa: E731
    intended = {
        "sd1-kohya.safetensors": build_sd1_kohya(fresh("sd1")),
        "sdxl-kohya.safetensors": build_sdxl_kohya(fresh("sdxl")),
    }
    b = fresh("sd1")
    intended["sd1-peft.safetensors"] = build_peft_lora(
        "sd1-peft.safetensors", {"unet": b.unet, "text_encoder": b.text_encoder},
        {"unet": PEFT_UNET_TARGETS, "text_encoder": PEFT_TE_TARGETS}, 4, 6, SEEDS["lora"] + 1, LORA_UP_SCALE["sd1-peft"], True)
    b = fresh("sd1")
    intended["sd1-lcm-peft.safetensors"] = build_peft_lora(
        "sd1-lcm-peft.safetensors", {"unet": b.unet}, {"unet": LCM_TARGETS}, 4, 4, SEEDS["lora"] + 3,
        LORA_UP_SCALE["sd1-lcm-peft"], False)
    loras = {}
    for file, model, alpha, r in (("sd1-kohya.safetensors", "sd1", None, None), ("sd1-peft.safetensors", "sd1", 6, 4),
                                  ("sd1-lcm-peft.safetensors", "sd1", 4, 4), ("sdxl-kohya.safetensors", "sdxl", None, None)):
        p = fresh(model)
        warnings = load_lora(p, file, "check")
        table = check_lora(p, "check", intended[file], alpha, r)
        with safe_open(str(LORA / file), "pt") as f:
            meta = f.metadata() or {}
            nkeys = len(list(f.keys()))
        loras[file] = {"model": model, "keys": nkeys, "modules": len(table), "load_warnings": warnings,
                       "safetensors_metadata": {k: (json.loads(v) if k == "lora_adapter_metadata" else v) for k, v in sorted(meta.items())},
                       "effective_columns": ["rank", "file_alpha (null: none in the file)", "scaling at weight 1.0",
                                             "lora_A conv kernel (null: Linear)"],
                       "effective": table}
        print(f"  {file}: {nkeys} keys, {len(table)} LoRA modules loaded with the file's tensors and scales")
    p = fresh("sd1")
    load_lora(p, "sd1-kohya.pt", "pt")
    check_lora(p, "pt", intended["sd1-kohya.safetensors"])
    loras["sd1-kohya.pt"] = {"model": "sd1", "same_as": "sd1-kohya.safetensors",
                             "format": "torch.save(dict of the same tensors), zip; loads to the same LoRA (asserted)"}

    print("textual inversion, .ckpt, bad inputs")
    emb = build_embeddings()
    p = fresh("sd1")
    p.load_textual_inversion(str(EMB / "a1111-style.pt"))
    ids = p.tokenizer.convert_tokens_to_ids(["a1111-style", "a1111-style_1", "a1111-style_2"])
    assert torch.equal(p.text_encoder.get_input_embeddings().weight[ids], emb["style"]), "A1111 .pt embedding"
    bad = build_ckpt_and_bad()

    q4 = q4_ref()
    taesd = taesd_ref()
    a1111_selftest()
    pw = prompt_weighting_ref(fresh("sd1"), fresh("sdxl"))

    print(f"cases ({len(CASES)})")
    entries, results = [], {}
    for idx, c in enumerate(CASES):
        entries.append(run_case(idx, c, results))

    doc = {
        "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "torch": torch.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
                     "peft_shim": PEFT_SHIM},
        "notes": NOTES,
        "models": configs(),
        "loras": loras,
        "embeddings": {
            "cat-toy.safetensors": {"layout": "diffusers learned_embeds: {'<cat-toy>': [2, 32]}", "token": "<cat-toy>"},
            "a1111-style.safetensors": {"layout": "A1111 safetensors: {'emb_params': [3, 32]}", "token": "a1111-style (the file stem; pass token=)"},
            "a1111-style.pt": {"layout": "torch.save of A1111's dict: string_to_token {'*': 265}, string_to_param {'*': [3, 32]}, "
                                         "name 'a1111-style', step 100, sd_checkpoint '0123abcd', sd_checkpoint_name 'sd1'",
                               "token": "a1111-style (its name)", "same_tensor_as": "a1111-style.safetensors"},
            "sdxl-pair.safetensors": {"layout": "{'clip_l': [2, 32], 'clip_g': [2, 48]}", "token": "<pair>"},
        },
        "bad": bad,
        "q4": q4,
        "taesd": taesd,
        "prompt_weighting": pw,
        "cases": entries,
    }
    (REF / "family_cases.json").write_text(compact_json(mf.json_safe(doc)) + "\n", encoding="utf-8")
    for path in outputs():  # save_pretrained writes some files 0600 (via temporary files)
        os.chmod(path, 0o644)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
