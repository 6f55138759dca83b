#!/usr/bin/env python3
"""Tiny seeded random-weight models for image-conditioned Stable Diffusion pipelines, and diffusers'
reference outputs for them: img2img, inpainting (9-channel UNet and 4-channel blending), depth2img,
ControlNet (single, multi, guess mode, guidance window, original single-file layout) and x4 upscaling.

Run through scripts/fixtures.sh after scripts/make_fixtures.py (it reads tests/fixtures/sd1 and sd2,
which it does not modify). Offline: every model is built from a config with seeded weights. One thread
(OMP_NUM_THREADS=1), so re-running reproduces byte-identical files; the script deletes its own outputs
first.

Outputs (see tests/fixtures/README.md, "Image-conditioned pipelines"):
  tests/fixtures/sd1-inpaint/ sd2-depth/ controlnet-a/ controlnet-b/ sd-x4-upscaler/   diffusers folders
  tests/fixtures/controlnet-a.safetensors     controlnet-a in the original lllyasviel layout
  tests/fixtures/images/                      input images (generated here)
  tests/fixtures/ref/cond_cases.json + cond_{index}.safetensors
"""

import inspect
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets offline env vars, one thread, deterministic algorithms)

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

FIX = mf.FIX
REF = mf.REF
IMG = FIX / "images"
W, H = 96, 64  # output size of every case (multiples of 32: VAE factor 8 x UNet factor 4)
ASTRO = "a photo of an astronaut riding a horse on mars"
NEG = "blurry, low quality"
CN_SCALE = 0.3  # zero convolutions: random after reinit, scaled down so the UNet output stays O(1)

OUTPUT_DIRS = ["sd1-inpaint", "sd2-depth", "controlnet-a", "controlnet-b", "sd-x4-upscaler", "images"]
OUTPUT_FILES = ["controlnet-a.safetensors"]


# --------------------------------------------------------------------------------------------
# input images (deterministic formulas + PIL drawing; no external data)
# --------------------------------------------------------------------------------------------


def smooth_rgb(w, h, phase=0.0):
    """Colourful smooth content in normalised coordinates (so sizes differ only by sampling)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = (x + 0.5) / w, (y + 0.5) / h
    r = 0.5 + 0.45 * np.sin(2.0 * np.pi * (0.9 * u + 0.3 * v) + phase)
    g = 0.5 + 0.45 * np.cos(2.0 * np.pi * (0.5 * u - 0.8 * v) + 0.7 * phase)
    b = 0.35 + 0.6 * v * (1 - u) + 0.05 * np.sin(9 * u)
    img = np.stack([r, g, b], -1)
    # soft disc
    d = np.sqrt(((u - 0.3) / 0.18) ** 2 + ((v - 0.55) / 0.27) ** 2)
    a = np.clip(1.5 - d, 0, 1)[..., None]
    img = img * (1 - a) + a * np.array([0.95, 0.85, 0.2])
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def draw_shapes(im, s):
    """Filled shapes; coordinates scaled by s = (sx, sy) from the 96x64 design."""
    d = ImageDraw.Draw(im)
    sx, sy = s
    d.rectangle([60 * sx, 8 * sy, 84 * sx, 26 * sy], fill=(200, 40, 60))
    d.polygon([(52 * sx, 58 * sy), (70 * sx, 34 * sy), (90 * sx, 58 * sy)], fill=(30, 90, 200))
    d.ellipse([6 * sx, 4 * sy, 20 * sx, 18 * sy], fill=(250, 250, 245))
    return im


def make_images():
    IMG.mkdir(parents=True)
    info = {}

    init = draw_shapes(Image.fromarray(smooth_rgb(W, H), "RGB"), (1, 1))
    init.save(IMG / "init.png")

    rgb = smooth_rgb(W, H, phase=1.3)
    y, x = np.mgrid[0:H, 0:W]
    alpha = np.clip(40 + 215 * x / (W - 1) - 60 * ((x - 30) ** 2 + (y - 40) ** 2 < 150), 0, 255).astype(np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA").save(IMG / "init_rgba.png")

    # 100x70: StableDiffusionImg2ImgPipeline has no height/width; its VaeImageProcessor floors the size
    # to a multiple of 8 (96x64) and resizes to that with PIL Lanczos.
    bw, bh = 100, 70
    big = draw_shapes(Image.fromarray(smooth_rgb(bw, bh), "RGB"), (bw / W, bh / H))
    big.save(IMG / "init_big.png")

    # mask: white = repaint. An ellipse with a soft ramp (~7 px) and a hard-edged rectangle.
    d = np.sqrt(((x - 44.0) / 26.0) ** 2 + ((y - 30.0) / 17.0) ** 2)
    m = np.clip((1.25 - d) / 0.45, 0, 1)
    m[44:58, 74:90] = 1.0
    mask = Image.fromarray(np.round(m * 255).astype(np.uint8), "L")
    mask.save(IMG / "mask.png")

    # depth: 16-bit (96x64) and 8-bit (48x32, smaller than the output)
    z = 9000 + 40000 * (y / (H - 1)) + 12000 * np.exp(-(((x - 62) / 14.0) ** 2 + ((y - 26) / 11.0) ** 2))
    Image.fromarray(np.round(z).astype(np.uint16)).save(IMG / "depth16.png")
    y2, x2 = np.mgrid[0:32, 0:48]
    z8 = 30 + 150 * (x2 / 47.0) + 60 * np.exp(-(((x2 - 16) / 7.0) ** 2 + ((y2 - 18) / 6.0) ** 2))
    Image.fromarray(np.clip(np.round(z8), 0, 255).astype(np.uint8), "L").save(IMG / "depth8.png")

    # control images: thin white lines on black
    def lines(w, h, kind):
        im = Image.new("RGB", (w, h), (0, 0, 0))
        dr = ImageDraw.Draw(im)
        sx, sy = w / W, h / H
        if kind == 1:
            dr.line([(4 * sx, 54 * sy), (40 * sx, 10 * sy), (70 * sx, 50 * sy), (92 * sx, 6 * sy)], fill=(255, 255, 255), width=1)
            dr.ellipse([50 * sx, 20 * sy, 80 * sx, 44 * sy], outline=(255, 255, 255), width=1)
            dr.rectangle([8 * sx, 8 * sy, 30 * sx, 30 * sy], outline=(255, 255, 255), width=1)
        else:
            for i in range(6):
                dr.line([(i * 16 * sx, 0), (i * 16 * sx + 20 * sx, (H - 1) * sy)], fill=(255, 255, 255), width=1)
            dr.arc([20 * sx, 10 * sy, 76 * sx, 60 * sy], 200, 340, fill=(255, 255, 255), width=2)
        return im

    lines(W, H, 1).save(IMG / "control.png")
    lines(W, H, 2).save(IMG / "control2.png")
    lines(48, 32, 1).save(IMG / "control_small.png")

    # upscaler input: 24x16 (x4 = 96x64)
    low = draw_shapes(Image.fromarray(smooth_rgb(24, 16, phase=0.6), "RGB"), (0.25, 0.25))
    low.save(IMG / "lowres.png")

    for p in sorted(IMG.iterdir()):
        im = Image.open(p)
        info[p.name] = {"size": list(im.size), "mode": im.mode}
    return info


def load_img(name):
    im = Image.open(IMG / name)
    im.load()
    return im


def depth_tensor(name):
    """What the cases pass as depth_map: raw integer pixel values as float32, shape [1, H, W]."""
    return torch.from_numpy(np.asarray(load_img(name)).astype(np.float32))[None]


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def unet_like(sd2, in_channels, seed):
    cfg = dict(mf.make_unet(sd2).config)
    cfg["in_channels"] = in_channels
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(cfg)
    mf.reinit(unet, seed)
    return unet.eval()


def copy_text_parts(src, dst):
    """Use the source model's text encoder and tokenizer folders verbatim (hub-style tokenizer files,
    sd1's legacy `text_model.` key layout, sd2's shards) instead of what save_pretrained wrote."""
    for comp in ("text_encoder", "tokenizer"):
        shutil.rmtree(dst / comp)
        shutil.copytree(src / comp, dst / comp)


def build_inpaint(p1):
    unet = unet_like(False, 9, 310)
    folder = FIX / "sd1-inpaint"
    StableDiffusionInpaintPipeline(
        vae=p1.vae, text_encoder=p1.text_encoder, tokenizer=p1.tokenizer, unet=unet, scheduler=p1.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(str(folder), safe_serialization=True)
    copy_text_parts(FIX / "sd1", folder)
    return folder


def build_depth(p2):
    unet = unet_like(True, 5, 320)
    folder = FIX / "sd2-depth"
    # depth_estimator / feature_extractor None: prepare_depth_map only touches them when depth_map is None,
    # and every case passes depth_map. model_index.json then records them as [null, null].
    StableDiffusionDepth2ImgPipeline(
        vae=p2.vae, text_encoder=p2.text_encoder, tokenizer=p2.tokenizer, unet=unet, scheduler=p2.scheduler,
        depth_estimator=None, feature_extractor=None,
    ).save_pretrained(str(folder), safe_serialization=True)
    copy_text_parts(FIX / "sd2", folder)
    idx = json.loads((folder / "model_index.json").read_text())
    assert idx["_class_name"] == "StableDiffusionDepth2ImgPipeline", idx
    return folder


def build_controlnet(name, unet, seed):
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16), load_weights_from_unet=False)
    mf.reinit(cn, seed)
    with torch.no_grad():
        for m in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]:
            m.weight.mul_(CN_SCALE)
            m.bias.mul_(CN_SCALE)
    cn.eval()
    folder = FIX / name
    cn.save_pretrained(str(folder), safe_serialization=True)
    return folder


def controlnet_to_ldm(sd, cfg):
    """diffusers ControlNetModel -> lllyasviel layout: inverse of diffusers' convert_controlnet_checkpoint.
    The UNet-encoder part maps as in make_fixtures.unet_to_ldm (input_blocks / middle_block)."""
    out, unet_part = {}, {}
    n_hint = len(cfg["conditioning_embedding_out_channels"])
    assert n_hint == 4, "diffusers hard-codes input_hint_block.14 as conv_out (4 channel entries)"
    for k, v in sd.items():
        parts = k.split(".")
        if k.startswith("controlnet_cond_embedding."):
            sub = parts[1]
            if sub == "conv_in":
                nk = f"input_hint_block.0.{parts[-1]}"
            elif sub == "conv_out":
                nk = f"input_hint_block.14.{parts[-1]}"
            else:  # blocks.j (conv, conv-stride-2 pairs) at Sequential index 2*(j+1) (SiLUs in between)
                nk = f"input_hint_block.{2 * (int(parts[2]) + 1)}.{parts[-1]}"
        elif k.startswith("controlnet_down_blocks."):
            nk = f"zero_convs.{parts[1]}.0.{parts[-1]}"
        elif k.startswith("controlnet_mid_block."):
            nk = f"middle_block_out.0.{parts[-1]}"
        else:
            unet_part[k] = v
            continue
        out["control_model." + nk] = v
    for k, v in mf.unet_to_ldm(unet_part, cfg).items():
        out["control_model." + k.removeprefix("model.diffusion_model.")] = v
    return {k: out[k].contiguous() for k in sorted(out)}


def write_controlnet_single_file(folder):
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    path = FIX / "controlnet-a.safetensors"
    save_file(controlnet_to_ldm(sd, cfg), str(path))
    cn = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True)
    mf.assert_same(cn.state_dict(), sd, "controlnet-a.safetensors")
    ref = ControlNetModel.from_pretrained(str(folder))
    assert all(cn.config[k] == ref.config[k] for k in ref.config if not k.startswith("_")), "config differs"
    print("  controlnet-a.safetensors: from_single_file(config=folder) == folder state_dict")
    return path


def build_upscaler(p2):
    """Like stabilityai/stable-diffusion-x4-upscaler (x4-upscaling.yaml: num_classes 1000, in 7 / out 4,
    attention at levels 1..3, disable_self_attentions [T, T, T, F], linear proj, 3-level f=4 VAE with
    scaling 0.08333, DDIM v-pred and a DDPM low-res noise scheduler, both scaled_linear 1e-4..0.02),
    with one level fewer, one layer per block and the channels of the other fixtures."""
    torch.manual_seed(401)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=7,
        out_channels=4,
        block_out_channels=mf.UNET_CHANNELS,
        layers_per_block=1,  # the real one has 2; 1 keeps the file small (and covers 1 layer per block)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True, False),  # level 1: attn1 is a 2nd cross-attention; level 2: self + cross
        cross_attention_dim=mf.HIDDEN,
        attention_head_dim=4,  # = 4 heads per block (head dim 8)
        use_linear_projection=True,
        num_class_embeds=1000,  # class label = noise_level
        norm_num_groups=mf.UNET_GROUPS,
    )
    mf.reinit(unet, 401)
    torch.manual_seed(402)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        norm_num_groups=mf.VAE_GROUPS,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=0.08333,
    )
    mf.reinit(vae, 402)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
    unet.eval()
    vae.eval()
    betas = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    scheduler = DDIMScheduler(
        **betas, clip_sample=False, prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="leading",
    )
    # the low-res scheduler config diffusers' single-file loader writes for the upscaler (= the hub's)
    low = DDPMScheduler(**betas, clip_sample=True, prediction_type="epsilon", variance_type="fixed_small")
    folder = FIX / "sd-x4-upscaler"
    StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=p2.text_encoder, tokenizer=p2.tokenizer, unet=unet, low_res_scheduler=low,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350,
    ).save_pretrained(str(folder), safe_serialization=True)
    copy_text_parts(FIX / "sd2", folder)
    return folder


# --------------------------------------------------------------------------------------------
# schedulers (same names and construction as make_fixtures.main)
# --------------------------------------------------------------------------------------------


def sched_config(s):
    return mf.json_safe({k: v for k, v in sorted(dict(s.config).items()) if k != "_use_default_values"})


# --------------------------------------------------------------------------------------------
# tracing: every torch.randn / randn_like during a pipeline call (shape, caller), UNet timesteps
# --------------------------------------------------------------------------------------------

_randn, _randn_like = torch.randn, torch.randn_like
TRACE = None
DIFFUSERS_DIR = str(Path(diffusers.__file__).parent)


def _site():
    """The diffusers call chain of a draw, innermost first, up to the pipeline method:
    e.g. 'DiagonalGaussianDistribution.sample <- retrieve_latents <- StableDiffusionInpaintPipeline._encode_vae_image
    <- StableDiffusionInpaintPipeline.prepare_mask_latents'."""
    f = sys._getframe(2)
    chain = []
    while f is not None:
        fn = f.f_code.co_filename
        if fn.startswith(DIFFUSERS_DIR) and not fn.endswith("torch_utils.py"):
            name = f.f_code.co_qualname
            if not chain or chain[-1] != name:
                chain.append(name)
            if "Pipeline." in name and not name.split(".")[-1].startswith("_encode"):
                break
        f = f.f_back
    return " <- ".join(chain) or "?"


def _traced_randn(*args, **kw):
    if TRACE is not None:
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        TRACE.append({"shape": [int(s) for s in shape], "site": _site(), "generator": kw.get("generator") is not None})
    return _randn(*args, **kw)


def _traced_randn_like(*args, **kw):
    if TRACE is not None:
        TRACE.append({"shape": list(args[0].shape), "site": _site(), "generator": False, "randn_like": True})
    return _randn_like(*args, **kw)


torch.randn = _traced_randn
torch.randn_like = _traced_randn_like


def collapse(draws):
    out = []
    for d in draws:
        if out and {k: v for k, v in out[-1].items() if k != "count"} == d:
            out[-1]["count"] += 1
        else:
            out.append({**d, "count": 1})
    return out


def run_traced(pipe, kwargs):
    """Run the pipeline; return (output, generator draws, timesteps of each UNet call)."""
    global TRACE
    ts = []

    def hook(_m, args, kw):
        t = args[1] if len(args) > 1 else kw["timestep"]
        ts.append(float(t))

    h = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    TRACE = []
    try:
        with torch.no_grad():
            out = pipe(**kwargs)
    finally:
        draws, TRACE = TRACE, None
        h.remove()
    assert all(d["generator"] for d in draws), f"draw without the generator: {draws}"
    return out, draws, ts


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------

# img2img: every scheduler name once (+ the two model defaults)
IMG2IMG = [
    dict(model="sd1", scheduler=None, strength=0.75, steps=5),
    dict(model="sd2", scheduler=None, strength=0.8, steps=5),
    dict(model="sd1", scheduler="ddim", strength=0.6, steps=5, eta=0.5),
    dict(model="sd1", scheduler="pndm", strength=0.5, steps=6, negative_prompt=NEG),
    dict(model="sd2", scheduler="ddpm", strength=0.3, steps=6),
    dict(model="sd1", scheduler="euler", strength=1.0, steps=5),
    dict(model="sd2", scheduler="euler-a", strength=0.75, steps=5, batch=2),
    dict(model="sd1", scheduler="heun", strength=0.6, steps=4),
    dict(model="sd2", scheduler="lms", strength=0.8, steps=5),
    dict(model="sd1", scheduler="dpmpp-2m", strength=0.5, steps=6, image="init_rgba.png"),
    dict(model="sd2", scheduler="dpmpp-2m-karras", strength=0.75, steps=5, guidance=1.0),
    dict(model="sd1", scheduler="dpmpp-2m-sde-karras", strength=0.8, steps=5, image="init_big.png"),
    dict(model="sd2", scheduler="unipc", strength=1.0, steps=4, negative_prompt=NEG),
    dict(model="sd1", scheduler="lcm", strength=0.6, steps=5, guidance=1.5),
]
INPAINT = [
    dict(model="sd1-inpaint", scheduler=None, strength=1.0, steps=5),
    dict(model="sd1-inpaint", scheduler="euler-a", strength=0.75, steps=5),
    dict(model="sd1-inpaint", scheduler="dpmpp-2m", strength=1.0, steps=5, mask_blur=4),
    dict(model="sd1-inpaint", scheduler="ddim", strength=1.0, steps=4, batch=2, negative_prompt=NEG),
    # 4-channel UNet: latent blending
    dict(model="sd1", scheduler="pndm", strength=1.0, steps=5),
    dict(model="sd1", scheduler="euler", strength=0.8, steps=5, image="init_big.png"),
    dict(model="sd2", scheduler="ddim", strength=0.6, steps=5),
]
DEPTH = [
    dict(model="sd2-depth", scheduler=None, strength=0.8, steps=5, depth="depth16.png"),
    dict(model="sd2-depth", scheduler="euler-a", strength=1.0, steps=5, depth="depth8.png"),
    dict(model="sd2-depth", scheduler="dpmpp-2m", strength=0.7, steps=5, depth="depth16.png", negative_prompt=NEG),
]
CONTROL = [
    dict(model="sd1", scheduler=None, steps=5, controlnets=[("controlnet-a", "control.png", 1.0)]),
    dict(model="sd1", scheduler="euler-a", steps=5, controlnets=[("controlnet-a", "control.png", 0.8)], guess_mode=True),
    dict(model="sd1", scheduler="ddim", steps=5, controlnets=[("controlnet-a", "control.png", 1.0)],
         control_guidance_start=0.2, control_guidance_end=0.8),
    dict(model="sd1", scheduler="euler", steps=5, controlnets=[("controlnet-a", "control_small.png", 1.0)]),
    dict(model="sd1", scheduler="unipc", steps=5,
         controlnets=[("controlnet-a", "control.png", 1.0), ("controlnet-b", "control2.png", 0.5)]),
    dict(model="sd1", scheduler="dpmpp-2m", steps=5, controlnets=[("controlnet-a", "control.png", 1.0)],
         controlnet_file="controlnet-a.safetensors", negative_prompt=NEG),
]
UPSCALE = [
    dict(model="sd-x4-upscaler", scheduler=None, steps=5, noise_level=20),
    dict(model="sd-x4-upscaler", scheduler="euler-a", steps=5, noise_level=100, batch=2),
    dict(model="sd-x4-upscaler", scheduler=None, steps=5, noise_level=50, guidance=1.0),
]

PIPE_CLASS = {
    "img2img": StableDiffusionImg2ImgPipeline,
    "inpaint": StableDiffusionInpaintPipeline,
    "depth2img": StableDiffusionDepth2ImgPipeline,
    "controlnet": StableDiffusionControlNetPipeline,
    "upscale": StableDiffusionUpscalePipeline,
}


def check_image(name, img):
    img = img.float()
    frac_sat = ((img <= 0) | (img >= 1)).float().mean().item()
    assert img.std() > 0.02, f"{name}: constant image (std {img.std():.4f})"
    assert frac_sat < 0.5, f"{name}: {frac_sat:.0%} of the values saturated"
    return frac_sat


def main():
    for d in OUTPUT_DIRS:
        if (FIX / d).exists():
            shutil.rmtree(FIX / d)
    for f in OUTPUT_FILES:
        (FIX / f).unlink(missing_ok=True)
    for f in sorted(REF.glob("cond_*")):
        f.unlink()

    print("images")
    image_info = make_images()
    # the blurred mask exactly as the blurred-mask case hands it to diffusers
    VaeBlur = diffusers.image_processor.VaeImageProcessor.blur
    VaeBlur(load_img("mask.png"), blur_factor=4).save(IMG / "mask_blurred.png")
    image_info["mask_blurred.png"] = {"size": [W, H], "mode": "L", "made_by": "VaeImageProcessor.blur(mask.png, blur_factor=4)"}

    print("models")
    p1 = StableDiffusionPipeline.from_pretrained(str(FIX / "sd1"), dtype=torch.float32)
    p2 = StableDiffusionPipeline.from_pretrained(str(FIX / "sd2"), dtype=torch.float32)
    f_inp = build_inpaint(p1)
    f_dep = build_depth(p2)
    f_cna = build_controlnet("controlnet-a", p1.unet, 330)
    f_cnb = build_controlnet("controlnet-b", p1.unet, 340)
    write_controlnet_single_file(f_cna)
    f_up = build_upscaler(p2)

    # load everything back the way a user would
    bases = {
        "sd1": p1,
        "sd2": p2,
        "sd1-inpaint": StableDiffusionInpaintPipeline.from_pretrained(str(f_inp), dtype=torch.float32),
        # [null, null] components are not optional for this class: from_pretrained must be told (ValueError otherwise)
        "sd2-depth": StableDiffusionDepth2ImgPipeline.from_pretrained(
            str(f_dep), dtype=torch.float32, depth_estimator=None, feature_extractor=None
        ),
        "sd-x4-upscaler": StableDiffusionUpscalePipeline.from_pretrained(str(f_up), dtype=torch.float32),
    }
    assert bases["sd2-depth"].depth_estimator is None and bases["sd2-depth"].feature_extractor is None
    cns = {
        "controlnet-a": ControlNetModel.from_pretrained(str(f_cna), dtype=torch.float32).eval(),
        "controlnet-b": ControlNetModel.from_pretrained(str(f_cnb), dtype=torch.float32).eval(),
    }
    for name, comp in (("sd1-inpaint", "unet"), ("sd2-depth", "unet"), ("sd-x4-upscaler", "unet"),
                       ("sd-x4-upscaler", "vae")):
        sd = load_file(str(FIX / name / comp / "diffusion_pytorch_model.safetensors"))
        mf.assert_same(getattr(bases[name], comp).state_dict(), sd, f"{name} {comp}")
    for name, src in (("sd1-inpaint", "sd1"), ("sd2-depth", "sd2"), ("sd-x4-upscaler", "sd2")):
        mf.assert_same(bases[name].text_encoder.state_dict(), bases[src].text_encoder.state_dict(), f"{name} te")
    for name in ("sd1-inpaint", "sd2-depth"):
        src = "sd1" if name == "sd1-inpaint" else "sd2"
        mf.assert_same(bases[name].vae.state_dict(), bases[src].vae.state_dict(), f"{name} vae")

    cases = (
        [("img2img", c) for c in IMG2IMG]
        + [("inpaint", c) for c in INPAINT]
        + [("depth2img", c) for c in DEPTH]
        + [("controlnet", c) for c in CONTROL]
        + [("upscale", c) for c in UPSCALE]
    )
    print(f"cases ({len(cases)})")
    entries = []
    for idx, (kind, c) in enumerate(cases):
        base = bases[c["model"]]
        comps = {k: v for k, v in base.components.items()}
        # every entry has every key (null / [] where a kind does not use it)
        e = {
            "index": idx,
            "kind": kind,
            "pipeline": PIPE_CLASS[kind].__name__,
            "model": c["model"],
            "unet_in_channels": base.unet.config.in_channels,
            "scheduler": None,
            "scheduler_class": None,
            "scheduler_config": None,
            "prompt": c.get("prompt", ASTRO),
            "negative_prompt": c.get("negative_prompt"),
            "seed": 1000 + idx,
            "steps": c["steps"],
            "guidance": c.get("guidance", 7.5),
            "eta": c.get("eta", 0.0),
            "width": W,
            "height": H,
            "batch": c.get("batch", 1),
            "strength": None,
            "image": None,
            "image_size": None,
            "image_mode": None,
            "image_convert": None,
            "resized": False,
            "mask": None,
            "mask_blur": None,
            "mask_blurred_file": None,
            "blend": None,
            "depth": None,
            "depth_size": None,
            "depth_mode": None,
            "depth_map": None,
            "controlnets": [],
            "controlnet_file": None,
            "guess_mode": None,
            "control_guidance_start": None,
            "control_guidance_end": None,
            "noise_level": None,
            "max_noise_level": None,
            "low_res_scheduler_class": None,
            "low_res_scheduler_config": None,
        }
        kw = dict(
            prompt=e["prompt"], negative_prompt=e["negative_prompt"], num_inference_steps=e["steps"],
            guidance_scale=e["guidance"], eta=e["eta"], num_images_per_prompt=e["batch"],
        )
        extra = {}
        if kind in ("img2img", "inpaint", "depth2img"):
            e["strength"] = c["strength"]
            kw["strength"] = c["strength"]
            name = c.get("image", "init.png")
            im = load_img(name)
            e["image"] = name
            e["image_size"] = list(im.size)
            e["image_mode"] = im.mode
            if im.mode == "RGBA":
                # StableDiffusionImg2ImgPipeline's VaeImageProcessor has do_convert_rgb=False: a 4-channel
                # image would be taken for latents (a 96x64 RGBA image gives a 768x512 output). The case
                # drops alpha itself, as PIL's convert("RGB") does (no compositing).
                im = im.convert("RGB")
                e["image_convert"] = "RGB (done by the script: PIL convert('RGB') drops alpha)"
            e["resized"] = im.size != (W, H)
            kw["image"] = im
            if e["resized"]:
                extra["resized_image"] = torch.from_numpy(np.array(im.resize((W, H), resample=Image.LANCZOS)))
        if kind == "inpaint":
            mask = load_img("mask.png")
            e["mask"] = "mask.png"
            e["mask_blur"] = c.get("mask_blur")
            if e["mask_blur"]:
                mask = comps_mask_blur(mask, e["mask_blur"])
                e["mask_blurred_file"] = "mask_blurred.png"
                assert np.array_equal(np.asarray(mask), np.asarray(load_img("mask_blurred.png")))
            kw["mask_image"] = mask
            kw["height"], kw["width"] = H, W
            e["unet_in_channels"] = base.unet.config.in_channels
            e["blend"] = base.unet.config.in_channels == 4
        if kind == "depth2img":
            e["depth"] = c["depth"]
            dimg = load_img(c["depth"])
            e["depth_size"] = list(dimg.size)
            e["depth_mode"] = dimg.mode
            e["depth_map"] = "torch.from_numpy(np.asarray(Image.open(depth)).astype(np.float32))[None]: [1, H, W], raw integer values"
            kw["depth_map"] = depth_tensor(c["depth"])
        if kind == "controlnet":
            nets, imgs, scales = [], [], []
            e["controlnets"] = []
            for folder, cimg, scale in c["controlnets"]:
                net = cns[folder]
                if c.get("controlnet_file"):
                    net = ControlNetModel.from_single_file(str(FIX / c["controlnet_file"]), config=str(FIX / folder),
                                                           local_files_only=True).eval()
                nets.append(net)
                ci = load_img(cimg)
                imgs.append(ci)
                scales.append(scale)
                ent = {"folder": folder, "image": cimg, "scale": scale, "image_size": list(ci.size),
                       "image_mode": ci.mode, "resized": ci.size != (W, H)}
                if c.get("controlnet_file"):
                    ent["controlnet_file"] = c["controlnet_file"]
                    e["controlnet_file"] = c["controlnet_file"]
                e["controlnets"].append(ent)
                if ci.size != (W, H):
                    extra["resized_control"] = torch.from_numpy(
                        np.array(ci.convert("RGB").resize((W, H), resample=Image.LANCZOS))
                    )
            comps["controlnet"] = nets[0] if len(nets) == 1 else nets
            kw["image"] = imgs[0] if len(imgs) == 1 else imgs
            kw["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
            e["guess_mode"] = c.get("guess_mode", False)
            e["control_guidance_start"] = c.get("control_guidance_start", 0.0)
            e["control_guidance_end"] = c.get("control_guidance_end", 1.0)
            kw["guess_mode"] = e["guess_mode"]
            kw["control_guidance_start"] = e["control_guidance_start"]
            kw["control_guidance_end"] = e["control_guidance_end"]
            kw["height"], kw["width"] = H, W
            comps.pop("image_encoder", None)
            comps.setdefault("safety_checker", None)
            comps.setdefault("feature_extractor", None)
        if kind == "upscale":
            low = load_img("lowres.png")
            e["image"] = "lowres.png"
            e["image_size"] = list(low.size)
            e["image_mode"] = low.mode
            e["noise_level"] = c["noise_level"]
            e["max_noise_level"] = base.config.max_noise_level
            kw["image"] = low
            kw["noise_level"] = c["noise_level"]

        cls = PIPE_CLASS[kind]
        params = set(inspect.signature(cls.__init__).parameters)
        comps = {k: v for k, v in comps.items() if k in params}
        if "requires_safety_checker" in params:
            comps["requires_safety_checker"] = False
        # As a user switches schedulers: the pipeline as loaded (its __init__ fixes up the model's
        # own scheduler), then pipe.scheduler = X.from_config(pipe.scheduler.config).
        pipe = cls(**comps)
        sched = mf.make_sched(c["scheduler"], pipe.scheduler)
        pipe.scheduler = sched
        pipe.set_progress_bar_config(disable=True)
        e["scheduler"] = c["scheduler"]
        e["scheduler_class"] = type(sched).__name__
        e["scheduler_config"] = sched_config(sched)
        if kind == "upscale":
            e["low_res_scheduler_class"] = type(pipe.low_res_scheduler).__name__
            e["low_res_scheduler_config"] = sched_config(pipe.low_res_scheduler)

        out, draws, ts = run_traced(pipe, {**kw, "generator": mf.gen(e["seed"]), "output_type": "np"})
        img = torch.from_numpy(out.images).float()
        e["scheduler_timesteps"] = [float(t) for t in sched.timesteps]
        # the latents run: a fresh pipeline with a fresh scheduler of the same config
        pipe_l = cls(**comps)
        pipe_l.scheduler = sched.__class__.from_config(sched.config)
        pipe_l.set_progress_bar_config(disable=True)
        out_l, draws_l, ts_l = run_traced(pipe_l, {**kw, "generator": mf.gen(e["seed"]), "output_type": "latent"})
        lat = out_l.images
        assert draws_l == draws and ts_l == ts, "latent run differs from the image run"
        with torch.no_grad():
            dec = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
        redo = torch.from_numpy(pipe.image_processor.postprocess(dec, output_type="np")).float()
        assert torch.equal(redo, img), f"case {idx}: decode(latents) != image"
        assert list(img.shape) == [e["batch"], H, W, 3], img.shape
        check_draws(kind, e, draws)
        check_resized(kind, pipe, kw, extra)
        e["timesteps"] = ts  # one entry per UNet call, in order (a CFG pair is one call)
        e["generator_draws"] = collapse([{k: v for k, v in d.items() if k != "generator"} for d in draws])
        e["image_shape"] = list(img.shape)
        e["latents_shape"] = list(lat.shape)
        sat = check_image(f"case {idx}", img)
        e["saturated_fraction"] = round(sat, 4)
        mf.stats(f"case {idx} {kind} {c['model']} {c['scheduler']} image", img)
        tensors = {"image": img, "latents": lat, **extra}
        if kind == "inpaint":
            mc = pipe.mask_processor.preprocess(kw["mask_image"], height=H, width=W)
            tensors["mask_latent"] = torch.nn.functional.interpolate(mc, size=(H // 8, W // 8))
            check_inpaint_seed(pipe_l, kw, e, img, mc)
            if not e["blend"]:
                check_sensitive(pipe_l, kw, e, img, "mask_image", kw["mask_image"].transpose(Image.FLIP_LEFT_RIGHT))
        if kind == "depth2img":
            check_sensitive(pipe_l, kw, e, img, "depth_map", kw["depth_map"].flip(-1))
            tensors["depth_latent"] = pipe.prepare_depth_map(kw["image"], kw["depth_map"], 1, False, torch.float32,
                                                             torch.device("cpu"))
        if kind == "upscale":
            check_sensitive(pipe_l, kw, e, img, "image", kw["image"].transpose(Image.FLIP_LEFT_RIGHT))
        if kind == "controlnet":
            check_controlnet(idx, c, e, {**comps, "scheduler": sched}, kw, img, p1, cns)
        mf.save_tensors(REF / f"cond_{idx}.safetensors", tensors)
        entries.append(e)

    doc = {
        "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "pillow": PIL.__version__, "numpy": np.__version__},
        "images": image_info,
        "notes": NOTES,
        "cases": entries,
    }
    (REF / "cond_cases.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    vae_tiling(p1.vae)
    print("done")


@torch.no_grad()
def vae_tiling(vae):
    """diffusers' tiled VAE decode (enable_tiling) of sd1's VAE: sample_size 32, so 4x4-latent
    tiles every 3 latents, blended over 8 pixels; latents 10x14 give a 4x5 grid of tiles."""
    lat = torch.randn(2, 4, 10, 14, generator=mf.gen(77))
    full = vae.decode(lat).sample
    vae.enable_tiling()
    tiled = vae.decode(lat).sample
    vae.disable_tiling()
    d = (tiled - full).abs().max().item()
    assert d > 1e-3, "tiling changed nothing: the tiles do not overlap the blend"
    print(f"vae tiling: tiled vs full max |diff| {d:.4f}")
    mf.save_tensors(REF / "vae_tiled.safetensors", {"latents": lat, "tiled": tiled, "full": full})


def comps_mask_blur(mask, factor):
    return diffusers.image_processor.VaeImageProcessor.blur(mask, blur_factor=factor)


def check_draws(kind, e, draws):
    """The traced draws must follow the order written in NOTES."""
    B, lat = e["batch"], [4, H // 8, W // 8]
    enc = ("DiagonalGaussianDistribution.sample", [1] + lat)
    exp = []
    if kind in ("img2img", "depth2img"):
        exp = [enc, ("prepare_latents", [B] + lat)]
    elif kind == "inpaint":
        exp = ([enc] if e["blend"] or e["strength"] < 1 else []) + [("prepare_latents", [B] + lat),
                                                                     ("prepare_mask_latents", [1] + lat)]
    elif kind == "controlnet":
        exp = [("prepare_latents", [B] + lat)]
    elif kind == "upscale":
        lr = [H // 4, W // 4]
        exp = [("StableDiffusionUpscalePipeline.__call__", [1, 3] + lr), ("prepare_latents", [B, 4] + lr)]
    assert len(draws) >= len(exp), (kind, draws)
    for (site, shape), d in zip(exp, draws):
        assert site in d["site"] and d["shape"] == shape, (e["index"], kind, exp, draws)
    step_shape = [B, 4, H // 4, W // 4] if kind == "upscale" else [B] + lat
    for d in draws[len(exp):]:
        assert "Scheduler.step" in d["site"] and d["shape"] == step_shape, (e["index"], d)


def check_resized(kind, pipe, kw, extra):
    """The stored PIL resizes are exactly what the pipeline's image processors compute."""
    if "resized_image" in extra:
        hw = {} if kind == "img2img" else {"height": H, "width": W}
        pre = pipe.image_processor.preprocess(kw["image"], **hw)
        mine = torch.from_numpy(extra["resized_image"].numpy().astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        assert torch.equal(pre, 2.0 * mine - 1.0)
    if "resized_control" in extra:
        ci = kw["image"][0] if isinstance(kw["image"], list) else kw["image"]
        pre = pipe.control_image_processor.preprocess(ci, height=H, width=W)
        mine = torch.from_numpy(extra["resized_control"].numpy().astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        assert torch.equal(pre, mine)


def check_sensitive(pipe, kw, e, img, key, altered):
    """Changing one conditioning input (flipped left-right) must change the output."""
    with torch.no_grad():
        other = pipe(**{**kw, key: altered, "generator": mf.gen(e["seed"]), "output_type": "np"}).images
    d = np.abs(other - img.numpy()).max()
    print(f"    {key} flipped: max |diff| {d:.3f}")
    assert d > 0.02, (e["index"], key, d)


def check_inpaint_seed(pipe, kw, e, img, mc):
    """Another seed must change the masked region."""
    with torch.no_grad():
        other = pipe(**{**kw, "generator": mf.gen(e["seed"] + 500), "output_type": "np"}).images
    m = (mc[0, 0] >= 0.5).numpy()
    d = np.abs(other - img.numpy())[:, m].max()
    print(f"    masked region, other seed: max |diff| {d:.3f}")
    assert d > 0.02


def check_controlnet(idx, c, e, comps, kw, img, p1, cns):
    g = lambda: mf.gen(e["seed"])  # noqa: E731
    sch = lambda: comps["scheduler"].__class__.from_config(comps["scheduler"].config)  # noqa: E731
    # Built with the case's scheduler and then switched to it again, as the case's pipeline was
    # (the constructor's fix-ups must not touch it).
    def with_sched(pipe):
        pipe.scheduler = sch()
        return pipe
    plain = with_sched(StableDiffusionPipeline(**p1.components))
    plain.set_progress_bar_config(disable=True)
    pkw = {k: v for k, v in kw.items() if k not in ("image", "controlnet_conditioning_scale", "guess_mode",
                                                    "control_guidance_start", "control_guidance_end")}
    with torch.no_grad():
        ref = plain(**pkw, generator=g(), output_type="np").images
    d = np.abs(ref - img.numpy()).max()
    print(f"    vs no ControlNet: max |diff| {d:.3f}")
    assert d > 0.02
    if len(c["controlnets"]) > 1:
        single = with_sched(StableDiffusionControlNetPipeline(**{**comps, "controlnet": comps["controlnet"][0]}))
        single.set_progress_bar_config(disable=True)
        with torch.no_grad():
            s = single(**{**kw, "image": kw["image"][0], "controlnet_conditioning_scale": kw["controlnet_conditioning_scale"][0]},
                       generator=g(), output_type="np").images
        d = np.abs(s - img.numpy()).max()
        print(f"    multi vs single: max |diff| {d:.3f}")
        assert d > 0.02
    if c.get("controlnet_file"):
        folder = with_sched(StableDiffusionControlNetPipeline(**{**comps, "controlnet": cns["controlnet-a"]}))
        folder.set_progress_bar_config(disable=True)
        with torch.no_grad():
            f = folder(**kw, generator=g(), output_type="np").images
        assert np.array_equal(f, img.numpy()), "single-file ControlNet != folder ControlNet"
        print("    single-file ControlNet == folder ControlNet (bit-exact)")


# --------------------------------------------------------------------------------------------
# notes for the Rust side (read from the diffusers source of the installed version; the traced draws
# of every case are in its entry as "generator_draws")
# --------------------------------------------------------------------------------------------

NOTES = {
    "source": f"diffusers {diffusers.__version__} source (pipeline_stable_diffusion_img2img.py, _inpaint.py, _depth2img.py, "
              "controlnet/pipeline_controlnet.py, _upscale.py, image_processor.py, models/controlnets/controlnet.py). "
              "Every case's entry has `generator_draws`: every torch.randn made during the call, traced, in order "
              "(shape, caller; consecutive equal draws collapsed with `count`). `timesteps`: the timestep of every "
              "UNet call in order (CFG batches are one call); `scheduler_timesteps`: scheduler.timesteps after "
              "set_timesteps (before the strength cut).",
    "common": [
        "One CPU torch.Generator(manual_seed(seed)) feeds every draw; B = batch (num_images_per_prompt) since prompt is one string.",
        "VAE sampling: latent_dist.sample(generator) = mean + exp(0.5*clamp(logvar,-30,20)) * randn(mean.shape); then * vae.scaling_factor.",
        "The init image is encoded ONCE at batch 1 (one randn [1,4,h,w]); the latents are then repeated to B (torch.cat).",
        "strength: init_timestep = min(int(steps*strength), steps); t_start = steps - init_timestep; timesteps = scheduler.timesteps[t_start*order:]; scheduler.set_begin_index(t_start*order); the noise is added at timesteps[0] with scheduler.add_noise (Euler-type schedulers: sigma at index begin_index).",
        "CFG (guidance > 1): UNet input is cat([latents]*2) after scale_model_input; embeddings cat([negative_or_empty, prompt]); noise = uncond + g*(text - uncond). guidance <= 1: one batch, no negative prompt encoded.",
        "Cut schedules: DDIM/DDPM/PNDM have no set_begin_index (DDIM/DDPM index by t; PNDM's PLMS counter starts at 0 at the first cut timestep, so with skip_prk_steps its 'repeat the 2nd timestep' warm-up lands on the cut list: case 3 runs [499, 333, 167, 1] for 3 steps: call 2 redoes 499 -> 333 with the averaged eps, calls 3 and 4 step t -> t - 1000//steps from latents that are one slot behind; case 0 likewise starts on the repeated 601). Heun (order 2) cuts at t_start*2 and may start on a pair's second entry, as a first-order step (case 7: scheduler [751, 501, 501, 251, 251, 1, 1] -> runs [251, 1, 1]). Karras DPM++ can run t = 0 (case 10).",
        "Scheduler step draws (same as text-to-image, see README): euler-a, ddim with eta>0, ddpm (t>0), dpmpp-2m-sde, lcm (all but last) draw randn(latents.shape) per step.",
        "output_type='np': image = clamp(decode(latents / scaling_factor) * 0.5 + 0.5, 0, 1), NHWC float32. No safety checker.",
        "PIL resizes: VaeImageProcessor.resize = PIL Image.resize((w, h), resample=LANCZOS (upscaler: BICUBIC), reducing_gap=None) on the 8-bit image (uint8 output, then /255). PIL returns a copy when the size is unchanged. `resized_image` / `resized_control` in the safetensors hold PIL's uint8 result.",
    ],
    "img2img": {
        "generator_draws": [
            "1. vae.encode(image).latent_dist.sample: randn [1, 4, H/8, W/8] (prepare_latents via retrieve_latents)",
            "2. noise: randn [B, 4, H/8, W/8]; latents = scheduler.add_noise(init_latents (repeated to B), noise, timesteps[0]) (NOT multiplied by init_noise_sigma, even at strength 1.0, and the image still leaks in at strength 1.0)",
            "3. scheduler.step draws, per step, randn [B, 4, H/8, W/8] where the scheduler draws",
        ],
        "preprocessing": [
            "No height/width arguments: the size is the image's, floored to a multiple of 8 (vae_scale_factor); if that differs the image is resized with PIL Lanczos (init_big.png 100x70 -> 96x64).",
            "VaeImageProcessor(do_convert_rgb=False): RGB uint8 / 255 -> [0,1] -> 2x-1 -> [-1,1], NCHW. A 4-channel (RGBA) image is NOT converted: it is taken as latents (image.shape[1] == 4). The RGBA case converts with PIL convert('RGB') (alpha dropped) before the call.",
        ],
    },
    "inpaint": {
        "generator_draws": [
            "1. only if the UNet has 4 input channels OR strength < 1: vae.encode(init_image).latent_dist.sample: randn [1, 4, h, w] (prepare_latents -> _encode_vae_image)",
            "2. noise: randn [B, 4, h, w]. strength == 1.0: latents = noise * init_noise_sigma; else latents = scheduler.add_noise(image_latents, noise, timesteps[0]) (no init_noise_sigma)",
            "3. ALWAYS (even for the 4-channel UNet, which never uses it): vae.encode(masked_image).latent_dist.sample: randn [1, 4, h, w] (prepare_mask_latents -> _encode_vae_image)",
            "4. scheduler.step draws per step",
        ],
        "preprocessing": [
            "height/width are passed (default would be unet.sample_size*8); image: Lanczos resize to (W, H) if needed, [-1,1].",
            "mask (mask_processor: do_normalize=False, do_binarize=True, do_convert_grayscale=True): Lanczos resize if needed, convert('L'), /255, then binarize: value < 0.5 -> 0, >= 0.5 -> 1 (8-bit: <= 127 -> 0, >= 128 -> 1).",
            "mask_blur: VaeImageProcessor.blur(mask, blur_factor) = PIL ImageFilter.GaussianBlur(radius) on the 8-bit L image BEFORE the call (the user's step; images/mask_blurred.png is its output).",
            "masked_image = init_image * (mask < 0.5) (masked pixels become 0 = mid grey in [-1,1]); encoded with a draw (see above), * scaling_factor.",
            "mask to latent size: F.interpolate(mask, size=(H/8, W/8)) default mode 'nearest': latent (i, j) takes pixel (8i, 8j). `mask_latent` in the safetensors.",
            "9-channel UNet input per step: cat([scale_model_input(cat([latents]*2)), mask, masked_image_latents], dim=1) -> channels 4 latents, 1 mask, 4 masked-image latents; mask and masked latents are cat([x]*2) for CFG.",
            "4-channel UNet (blend), after each scheduler.step: init_latents_proper = image_latents, and if i < len(timesteps)-1: add_noise(image_latents, noise (the SAME noise as draw 2), timesteps[i+1]); latents = (1 - mask) * init_latents_proper + mask * latents (mask = the uncond half when CFG). At the last step the unmasked region gets the clean image latents.",
            "The output is NOT composited with the original image (only with padding_mask_crop, unused).",
        ],
    },
    "depth2img": {
        "generator_draws": [
            "Same as img2img: 1. vae.encode(image) sample randn [1,4,h,w]; 2. noise randn [B,4,h,w], add_noise at timesteps[0]; 3. scheduler.step draws",
        ],
        "preprocessing": [
            "depth_map (given; depth_estimator and feature_extractor are None in the folder): the case passes torch.from_numpy(np.asarray(PIL image).astype(float32))[None] = [1, Hd, Wd] raw values (depth16: 0..65535 uint16 values, depth8: 0..255).",
            "prepare_depth_map: F.interpolate(depth[:, None], size=(image_h/8, image_w/8), mode='bicubic', align_corners=False) (torch bicubic, A=-0.75, no antialias, border clamped), THEN per-sample min-max over the interpolated map: 2*(d - min)/(max - min) - 1 (range exactly [-1,1]). `depth_latent` in the safetensors.",
            "The size comes from the init image (PIL .size), not from the depth map.",
            "UNet input per step: cat([scale_model_input(cat([latents]*2)), depth], dim=1): 4 latent channels then 1 depth channel; depth repeated to B then cat([d]*2) for CFG.",
            "image: as img2img (no height/width, floor to multiple of 8, Lanczos, [-1,1]). scheduler.set_timesteps(steps) then the strength cut.",
        ],
    },
    "controlnet": {
        "generator_draws": [
            "1. latents: randn [B, 4, H/8, W/8] * init_noise_sigma (as text-to-image)",
            "2. scheduler.step draws per step",
        ],
        "preprocessing": [
            "control image (control_image_processor: do_convert_rgb=True, do_normalize=False): Lanczos resize to (width, height) if given and different (control_small.png 48x32 -> 96x64), convert('RGB'), /255 -> [0,1] (NOT [-1,1]). Without height/width the control image's own size (floored to /8) sets the output size.",
            "repeat_interleave to B (image batch 1 -> repeat B), then cat([img]*2) for CFG unless guess_mode.",
            "ControlNetConditioningEmbedding: conv_in 3x3 -> SiLU -> (conv 3x3 -> SiLU -> conv 3x3 stride 2 -> SiLU) x3 -> conv_out 3x3; added to conv_in(latents).",
            "Per step: the ControlNet gets the same scaled latent_model_input, t and prompt_embeds as the UNet (guess_mode with CFG: only the conditional half: scale_model_input(latents) and the text embeddings); down residual i = zero_conv_i(down_block_res_sample_i) * scale, mid = mid_zero_conv(mid) * scale; the UNet adds residual i to skip i (before the up blocks use them) and mid to the mid-block output. guess_mode: scales = logspace(-1, 0, n_down+1) * scale (0.1 .. 1.0; the last one for mid), and the uncond half of the residuals is zeros.",
            "control_guidance_start/end: keep_i = 1 - float(i/len(timesteps) < start or (i+1)/len(timesteps) > end); the scale used at step i is scale * keep_i (the ControlNet still runs with scale 0).",
            "Multi: list of ControlNets, images and scales; residuals summed over nets (each with its own scale and keep).",
        ],
    },
    "upscale": {
        "generator_draws": [
            "1. low-res image noise: randn [1, 3, h_lr, w_lr] (the preprocessed image's shape, batch 1); image = low_res_scheduler.add_noise(image, noise, noise_level) = sqrt(acp[noise_level])*image + sqrt(1-acp[noise_level])*noise (DDPM scaled_linear 1e-4..0.02)",
            "2. latents: randn [B, 4, h_lr, w_lr] * init_noise_sigma (latents have the LOW-RES size)",
            "3. scheduler.step draws per step",
        ],
        "preprocessing": [
            "image: VaeImageProcessor(resample='bicubic', vae_scale_factor=4): floor to a multiple of 4 (no resize for 24x16), /255, [-1,1]. The noisy image is not clamped.",
            "noisy image repeated: cat([image] * (2 if CFG else 1) * B) (batch 1 image); class_labels = noise_level (long) repeated to the UNet batch; UNet class embedding nn.Embedding(1000) added to the time embedding.",
            "UNet input per step: cat([scale_model_input(latents (x2 for CFG)), noisy_image], dim=1): 4 latent channels then 3 image channels.",
            "CFG iff guidance_scale > 1 (guidance 1.0: no negative/empty prompt encoded, batch B).",
            "decode: vae.decode(latents / 0.08333) (VAE scale factor 4: 3 blocks), then the usual [0,1] postprocess. Output = 4x the low-res size.",
            "noise_level must be <= max_noise_level (350, model_index.json).",
        ],
    },
}


if __name__ == "__main__":
    sys.exit(main())
