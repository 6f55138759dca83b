#!/usr/bin/env python3
"""Concatenation-conditioned latent diffusion models (the paper's section 3.3 for spatially aligned
conditions), made as a user would bring them: tiny seeded models written in the original CompVis
layout (`model.diffusion_model.*` openaimodel UNet, `first_stage_model.*`, a yaml config with
`conditioning_key: concat`), converted by scripts/convert_compvis_concat.py, and sampled by a
PyTorch reference written here from the CompVis DDIM sampler's maths (ldm/models/diffusion/ddim.py:
make_ddim_timesteps, make_ddim_sampling_parameters, p_sample_ddim) on the converted models.

Checks made here (the script fails otherwise): the conversion inverts the CompVis layout exactly
(every converted tensor equal to the model's own), and the reference sampler with eta = 0 agrees
with diffusers' DDIMScheduler on the converted scheduler config (the schedule translation).

Outputs:
  tests/fixtures/concat/{rescale,identity_gray,first_stage_kl}/   converted diffusers folders + ldm-web.json
  tests/fixtures/ref/concat_cases.json, concat.safetensors          cases and reference images
Run through scripts/fixtures.sh (one thread: byte-reproducible).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DIFFUSERS_VERBOSITY"] = "error"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel, VQModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import reinit  # noqa: E402
from convert_compvis_concat import RESNET_PARTS, unet_layout  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "concat"
REF = FIX / "ref"
IMAGES = FIX / "images"

torch.use_deterministic_algorithms(True)


# --- the CompVis layout, written from a diffusers model (the converter reads it back) -------------

def merge_qkv(q, k, v, heads):
    """openaimodel's legacy QKVAttention conv1d weight: per head, its q, k and v rows together."""
    c = q.shape[0]
    parts = [t.reshape(heads, c // heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * c, *q.shape[1:])


def unet_to_compvis(sd, cfg):
    """The converter's layout table read backwards."""
    out = {}
    attn = ["Attn" in t for t in cfg["down_block_types"]]
    for old, new, kind, channels in unet_layout(cfg, attn):
        for s in ["weight", "bias"]:
            if kind == "layer":
                out[f"{old}.{s}"] = sd[f"{new}.{s}"]
            elif kind == "resnet":
                out.update({f"{old}.{a}.{s}": sd[f"{new}.{b}.{s}"] for a, b in RESNET_PARTS if f"{new}.{b}.{s}" in sd})
            else:
                heads = channels // cfg["attention_head_dim"]
                out[f"{old}.norm.{s}"] = sd[f"{new}.group_norm.{s}"]
                proj = sd[f"{new}.to_out.0.{s}"]
                out[f"{old}.proj_out.{s}"] = proj[:, :, None] if s == "weight" else proj
                qkv = merge_qkv(*(sd[f"{new}.{x}.{s}"] for x in ["to_q", "to_k", "to_v"]), heads)
                out[f"{old}.qkv.{s}"] = qkv[:, :, None] if s == "weight" else qkv
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in sd.values())
    return out


def first_stage_to_compvis(sd, levels, layers):
    out = {}

    def put(new, old, conv=False):
        for s in ["weight", "bias"]:
            if f"{old}.{s}" in sd:
                t = sd[f"{old}.{s}"]
                out[f"{new}.{s}"] = t[:, :, None, None] if conv and s == "weight" else t

    def resnet(new, old):
        for a in ["norm1", "conv1", "norm2", "conv2"]:
            put(f"{new}.{a}", f"{old}.{a}")
        put(f"{new}.nin_shortcut", f"{old}.conv_shortcut")

    def mid(part):
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        put(f"{part}.mid.attn_1.norm", f"{part}.mid_block.attentions.0.group_norm")
        for a, b in [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]:
            put(f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}", conv=True)
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")

    for part in ["encoder", "decoder"]:
        put(f"{part}.conv_in", f"{part}.conv_in")
        put(f"{part}.norm_out", f"{part}.conv_norm_out")
        put(f"{part}.conv_out", f"{part}.conv_out")
        mid(part)
    for i in range(levels):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        put(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        # CompVis numbers the decoder's levels from the highest resolution, diffusers from the lowest.
        k = levels - 1 - i
        for j in range(layers + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}")
        put(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    for k in ["quant_conv", "post_quant_conv"]:
        put(k, k)
    if "quantize.embedding.weight" in sd:
        out["quantize.embedding.weight"] = sd["quantize.embedding.weight"]
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in sd.values()), "first stage tensors lost"
    return out


# --- tiny models ------------------------------------------------------------------------------------

def half_exact(model):
    """Weights that float16 holds exactly: the fixtures are stored converted with --half (half the
    bytes) and still are the very model the reference ran in float32."""
    for p in model.parameters():
        p.copy_(p.half().float())


UNET = dict(model_channels=32, channel_mult=[1, 1], num_res_blocks=1, attention_resolutions=[2], num_head_channels=16)
DDCONFIG = dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def make_unet(seed, in_channels, scale_shift):
    unet = UNet2DModel(
        sample_size=16, in_channels=in_channels, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, norm_num_groups=32, attn_norm_num_groups=32, resnet_time_scale_shift="scale_shift" if scale_shift else "default",
    ).eval()
    with torch.no_grad():
        reinit(unet, seed)
        half_exact(unet)
    return unet


def make_first_stage(seed, kind):
    common = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(32, 32), layers_per_block=1, latent_channels=3, norm_num_groups=32, sample_size=32)
    m = (VQModel(num_vq_embeddings=64, vq_embed_dim=3, **common) if kind == "vq" else AutoencoderKL(**common)).eval()
    with torch.no_grad():
        reinit(m, seed)
        if kind == "vq":
            m.quantize.embedding.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
        m.decoder.conv_out.weight.mul_(0.5)
        half_exact(m)
    return m


MODELS = {
    # The condition image bilinearly halved to the latent grid (SpatialRescaler), a VQ first stage.
    "rescale": dict(first_stage="vq", in_channels=6, scale_shift=False, parameterization="eps", scale_factor=1.0,
                    cond_stage={"target": "ldm.modules.encoders.modules.SpatialRescaler", "params": {"n_stages": 1, "method": "bilinear", "multiplier": 0.5, "in_channels": 3}}),
    # A gray condition given at the latent grid (torch.nn.Identity), scale-shift resnets.
    "identity_gray": dict(first_stage="vq", in_channels=4, scale_shift=True, parameterization="eps", scale_factor=1.0,
                          cond_stage={"target": "torch.nn.Identity"}),
    # The condition encoded by a KL first stage (its mode), v-prediction, a scale factor.
    "first_stage_kl": dict(first_stage="kl", in_channels=6, scale_shift=False, parameterization="v", scale_factor=0.5, cond_stage="__is_first_stage__"),
}


def compvis_config(m):
    fs_target = "ldm.models.autoencoder.VQModelInterface" if m["first_stage"] == "vq" else "ldm.models.autoencoder.AutoencoderKL"
    dd = dict(DDCONFIG, double_z=m["first_stage"] == "kl")
    fs_params = {"embed_dim": 3, "ddconfig": dd, "lossconfig": {"target": "torch.nn.Identity"}}
    if m["first_stage"] == "vq":
        fs_params["n_embed"] = 64
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0205, "timesteps": 1000, "image_size": 16, "channels": 3,
        "conditioning_key": "concat", "parameterization": m["parameterization"], "scale_factor": m["scale_factor"],
        "first_stage_key": "image", "cond_stage_key": "condition", "monitor": "val/loss",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(
            UNET, image_size=16, in_channels=m["in_channels"], out_channels=3, use_scale_shift_norm=m["scale_shift"])},
        "first_stage_config": {"target": fs_target, "params": fs_params},
        "cond_stage_config": m["cond_stage"],
    }}}


# --- the reference sampler ----------------------------------------------------------------------------

def compvis_alphas_cumprod(p):
    # ldm.modules.diffusionmodules.util.make_beta_schedule("linear") in float64, registered as float32.
    betas = torch.linspace(p["linear_start"] ** 0.5, p["linear_end"] ** 0.5, p["timesteps"], dtype=torch.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas.numpy(), axis=0), dtype=torch.float32)


def condition_tensor(path, c, width, height, factor, first_stage):
    """The condition as ldm-web.json says: the image (RGB or L) resized with PIL to the output size
    (the identity stage: to the latent grid), in `range`, then the stage."""
    img = Image.open(path)
    img = img.convert("RGB" if c["channels"] == 3 else "L")
    size = (width // factor, height // factor) if c["stage"] == "identity" else (width, height)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    lo, hi = c["range"]
    x = torch.from_numpy(arr * (hi - lo) + lo)[None]
    if c["stage"] == "rescale":
        r = c["rescale"]
        for _ in range(r["stages"]):
            x = F.interpolate(x, scale_factor=r["multiplier"], mode=r["method"])
    elif c["stage"] == "first_stage":
        with torch.no_grad():
            enc = first_stage.encode(x)
            x = enc.latents if isinstance(first_stage, VQModel) else enc.latent_dist.mode()
    return x


def ddim_sample(unet, first_stage, params, cond, steps, eta, seed, batch, shape):
    """CompVis DDIMSampler.sample with ddim_discretize="uniform": x_T from a generator seeded with
    `seed`, the eta noise from a second one seeded alike (ldm-web's LDM pipelines do the same)."""
    ac = compvis_alphas_cumprod(params)
    # make_ddim_timesteps takes range(0, T, T // steps): more than `steps` steps when they do not
    # divide T (7 for 6 of 1000), where diffusers' DDIMScheduler (and ldm-web) take exactly `steps`.
    assert params["timesteps"] % steps == 0, f"{steps} steps do not divide {params['timesteps']}: CompVis would run more"
    c = params["timesteps"] // steps
    ddim_t = np.asarray(list(range(0, params["timesteps"], c))) + 1
    alphas = ac[ddim_t].double().numpy()
    alphas_prev = np.asarray([ac[0].item()] + ac[ddim_t[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *shape), generator=g)
    noise_gen = torch.Generator().manual_seed(seed)
    cond = cond.expand(batch, -1, -1, -1)
    for i in reversed(range(len(ddim_t))):
        t = int(ddim_t[i])
        with torch.no_grad():
            out = unet(torch.cat([x, cond], dim=1), torch.full((batch,), t, dtype=torch.long)).sample
        a, ap, s = float(alphas[i]), float(alphas_prev[i]), float(sigmas[i])
        if params["parameterization"] == "v":
            # predict_eps_from_z_and_v / predict_start_from_z_and_v at the timestep.
            e_t = a ** 0.5 * out + (1 - a) ** 0.5 * x
            x0 = a ** 0.5 * x - (1 - a) ** 0.5 * out
        else:
            e_t = out
            x0 = (x - (1 - a) ** 0.5 * e_t) / a ** 0.5
        dir_xt = (1.0 - ap - s**2) ** 0.5 * e_t
        noise = s * torch.randn(x.shape, generator=noise_gen) if s > 0 else 0.0
        x = ap ** 0.5 * x0 + dir_xt + noise
    with torch.no_grad():
        img = first_stage.decode(x / params["scale_factor"]).sample
    return torch.clamp((img + 1.0) / 2.0, 0.0, 1.0).permute(0, 2, 3, 1).contiguous()


def diffusers_ddim(unet, first_stage, folder, cond, steps, seed, batch, shape, scale_factor):
    """The same loop on diffusers' DDIMScheduler from the converted config (eta = 0)."""
    sched = DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    sched.set_timesteps(steps)
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))
    cond = cond.expand(batch, -1, -1, -1)
    for t in sched.timesteps:
        with torch.no_grad():
            out = unet(torch.cat([x, cond], dim=1), t).sample
        x = sched.step(out, t, x).prev_sample
    with torch.no_grad():
        img = first_stage.decode(x / scale_factor).sample
    return torch.clamp((img + 1.0) / 2.0, 0.0, 1.0).permute(0, 2, 3, 1).contiguous()


CASES = [
    # (model, image, steps, eta, width, height, batch, seed)
    ("rescale", "init.png", 10, 0.0, 32, 32, 1, 3),
    ("rescale", "control.png", 4, 1.0, 48, 32, 2, 11),
    ("identity_gray", "init.png", 8, 0.0, 32, 48, 1, 5),
    ("first_stage_kl", "init_rgba.png", 10, 0.0, 32, 32, 1, 7),
    ("first_stage_kl", "control.png", 5, 0.5, 32, 32, 1, 8),
]


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    converter = Path(__file__).resolve().parent / "convert_compvis_concat.py"
    loaded = {}
    for i, (name, m) in enumerate(MODELS.items()):
        unet = make_unet(100 + i, m["in_channels"], m["scale_shift"])
        # One seed for both VQ first stages: git stores the identical files once.
        fs = make_first_stage(200 if m["first_stage"] == "vq" else 201, m["first_stage"])
        ucfg = dict(unet.config)
        sd = {f"model.diffusion_model.{k}": v for k, v in unet_to_compvis(unet.state_dict(), ucfg).items()}
        sd.update({f"first_stage_model.{k}": v for k, v in first_stage_to_compvis(fs.state_dict(), 2, 1).items()})
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, cfg_path = Path(tmp) / "model.ckpt", Path(tmp) / "config.yaml"
            torch.save({"state_dict": sd}, ckpt)
            cfg_path.write_text(yaml.safe_dump(compvis_config(m)))
            subprocess.run([sys.executable, str(converter), "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out", str(OUT / name), "--half"], check=True)
        # The conversion must give back every tensor of the models exactly.
        for sub, model in [("unet", unet), ("vqvae", fs)]:
            got = load_file(str(OUT / name / sub / "diffusion_pytorch_model.safetensors"))
            want = model.state_dict()
            assert set(got) == set(want), f"{name}/{sub}: keys differ: {sorted(set(got) ^ set(want))[:6]}"
            for k in want:
                assert torch.equal(got[k].float(), want[k]), f"{name}/{sub}: {k} differs after conversion"
        unet2 = UNet2DModel.from_pretrained(str(OUT / name / "unet"), torch_dtype=torch.float32).eval()
        fs2 = (VQModel if m["first_stage"] == "vq" else AutoencoderKL).from_pretrained(str(OUT / name / "vqvae"), torch_dtype=torch.float32).eval()
        loaded[name] = (unet2, fs2, compvis_config(m)["model"]["params"], json.loads((OUT / name / "ldm-web.json").read_text())["concat"])
        print(f"{name}: converted, {sum(p.numel() for p in unet2.parameters())} UNet parameters, condition {loaded[name][3]}")

    out, cases = {}, []
    for k, (name, image, steps, eta, w, h, batch, seed) in enumerate(CASES):
        unet, fs, params, c = loaded[name]
        cond = condition_tensor(IMAGES / image, c, w, h, 2, fs)
        shape = (3, h // 2, w // 2)
        assert cond.shape[-2:] == shape[1:], f"{name}: condition {tuple(cond.shape)} is not on the latent grid {shape}"
        img = ddim_sample(unet, fs, params, cond, steps, eta, seed, batch, shape)
        if eta == 0.0:
            d = diffusers_ddim(unet, fs, OUT / name, cond, steps, seed, batch, shape, params["scale_factor"])
            diff = (d - img).abs().max().item()
            assert diff < 1e-4, f"case {k}: diffusers' DDIMScheduler differs from the CompVis sampler by {diff}"
        key = f"case_{k}"
        out[key] = img
        out[f"{key}_condition"] = cond[0]
        cases.append({"key": key, "model": name, "image": image, "steps": steps, "eta": eta, "width": w, "height": h, "batch": batch, "seed": seed})
        print(f"{key}: {name} {w}x{h} steps {steps} eta {eta} batch {batch}: mean {img.mean().item():.4f} std {img.std().item():.4f}")
    save_file({k: v.float().contiguous() for k, v in out.items()}, str(REF / "concat.safetensors"), metadata={"format": "pt"})
    (REF / "concat_cases.json").write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
