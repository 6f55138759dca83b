#!/usr/bin/env python3
"""Converts an original CompVis latent-diffusion checkpoint whose config says `conditioning_key: concat`
(the paper's section 3.3 for spatially aligned conditions: the condition concatenated to the UNet's
input) into a diffusers-layout folder that ldm-web runs: `unet/` (UNet2DModel), `vqvae/` (VQModel or
AutoencoderKL), `scheduler/` (DDIM with the checkpoint's betas and CompVis' timestep spacing),
`model_index.json`, and `ldm-web.json` saying how the condition image becomes the UNet's extra
input channels.

    python scripts/convert_compvis_concat.py --checkpoint model.ckpt --config config.yaml --out DIR [--half]

The checkpoint may be a .ckpt / .pt (read with torch.load(weights_only=True): tensors and dicts only,
no code runs) or a .safetensors file. Supported condition stages (`cond_stage_config`):
  __is_first_stage__                            the condition image encoded by the first stage
  ldm.modules.encoders.modules.SpatialRescaler  the image resized to the latent grid by
                                                torch.nn.functional.interpolate in n_stages steps
  torch.nn.Identity / __is_unconditional__      the image given at the latent grid
Refused with a message: text or class conditioning (hybrid / crossattn / adm), SpatialRescaler
with a channel remap, resblock_updown, non-linear beta schedules, KL first stages whose embed_dim
differs from z_channels.

Needs torch, safetensors, pyyaml and diffusers (for its VAE key mapping); run with the fixture venv.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_vae_checkpoint


class Refused(Exception):
    pass


def target_of(cfg):
    return cfg if isinstance(cfg, str) else cfg.get("target", "")


def unet_config(p, image_size):
    """UNet2DModel's config for openaimodel.UNetModel's params `p`."""
    for key, what in [("use_spatial_transformer", "cross-attention (text-conditioned) UNets"), ("resblock_updown", "resblock_updown"), ("num_classes", "class-conditioned UNets")]:
        if p.get(key):
            raise Refused(f"{what} are not supported by this converter (unet_config.params.{key})")
    if p.get("use_new_attention_order"):
        raise Refused("use_new_attention_order is not supported (the legacy q/k/v order is)")
    ch, mult = p["model_channels"], list(p["channel_mult"])
    attn_res = list(p["attention_resolutions"])
    channels = [ch * m for m in mult]
    ds, attn_levels = 1, []
    for level in range(len(mult)):
        attn_levels.append(ds in attn_res)
        ds *= 2
    # openaimodel gives every attention layer either num_head_channels or num_heads; UNet2DModel
    # has one head width for all of them.
    attn_channels = [c for c, a in zip(channels, attn_levels) if a] + [channels[-1]]
    if p.get("num_head_channels", -1) != -1:
        head_dim = p["num_head_channels"]
    else:
        widths = {c // p["num_heads"] for c in attn_channels}
        if len(widths) != 1:
            raise Refused(f"num_heads={p['num_heads']} gives head widths {sorted(widths)} at different levels; UNet2DModel takes one")
        head_dim = widths.pop()
    if p.get("num_heads_upsample", -1) not in (-1, p.get("num_heads", -1)):
        raise Refused("num_heads_upsample differing from num_heads is not supported")
    return {
        "_class_name": "UNet2DModel",
        "sample_size": image_size,
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)],
        "block_out_channels": channels,
        "layers_per_block": p["num_res_blocks"],
        "attention_head_dim": head_dim,
        # CompVis' normalization() is GroupNorm32 (32 groups, eps 1e-5) everywhere.
        "norm_num_groups": 32,
        # openaimodel's middle AttentionBlock always normalises; diffusers drops that norm for
        # scale-shift resnets unless this is set.
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if p.get("use_scale_shift_norm") else "default",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu",
        "add_attention": True,
        "time_embedding_type": "positional",
    }, attn_levels


def split_qkv(qkv, heads):
    """The legacy QKVAttention layout: per head, q, k and v rows one after another."""
    c = qkv.shape[0] // 3
    w = qkv.reshape(heads, 3, c // heads, *qkv.shape[1:])
    return [w[:, i].reshape(c, *qkv.shape[1:]) for i in range(3)]


RESNET_PARTS = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]


def unet_layout(cfg, attn_levels):
    """Where openaimodel.UNetModel's modules are in UNet2DModel: (CompVis prefix, diffusers prefix,
    kind, channels), kind "layer" (weight and bias as they are), "resnet" or "attention". The
    converter reads it forward; scripts/concat_fixtures.py writes the CompVis layout with it."""
    rows = [("time_embed.0", "time_embedding.linear_1", "layer", 0), ("time_embed.2", "time_embedding.linear_2", "layer", 0),
            ("input_blocks.0.0", "conv_in", "layer", 0), ("out.0", "conv_norm_out", "layer", 0), ("out.2", "conv_out", "layer", 0)]
    channels = cfg["block_out_channels"]
    levels, n = len(channels), cfg["layers_per_block"]
    i = 0
    for level in range(levels):
        for j in range(n):
            i += 1
            rows.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", "resnet", 0))
            if attn_levels[level]:
                rows.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", "attention", channels[level]))
        if level != levels - 1:
            i += 1
            rows.append((f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "layer", 0))
    rows += [("middle_block.0", "mid_block.resnets.0", "resnet", 0), ("middle_block.1", "mid_block.attentions.0", "attention", channels[-1]),
             ("middle_block.2", "mid_block.resnets.1", "resnet", 0)]
    i = 0
    for up in range(levels):
        level = levels - 1 - up
        for j in range(n + 1):
            rows.append((f"output_blocks.{i}.0", f"up_blocks.{up}.resnets.{j}", "resnet", 0))
            if attn_levels[level]:
                rows.append((f"output_blocks.{i}.1", f"up_blocks.{up}.attentions.{j}", "attention", channels[level]))
            if j == n and up != levels - 1:
                rows.append((f"output_blocks.{i}.{2 if attn_levels[level] else 1}.conv", f"up_blocks.{up}.upsamplers.0.conv", "layer", 0))
            i += 1
    return rows


def convert_unet(sd, cfg, attn_levels):
    """openaimodel.UNetModel's state dict (without the `model.diffusion_model.` prefix) in UNet2DModel's names."""
    out = {}
    used = set()

    def take(old, new, squeeze=False):
        if old in sd:
            t = sd[old]
            used.add(old)
            out[new] = t.reshape(t.shape[0], t.shape[1]) if squeeze else t

    for old, new, kind, channels in unet_layout(cfg, attn_levels):
        for suffix in ["weight", "bias"]:
            if kind == "layer":
                take(f"{old}.{suffix}", f"{new}.{suffix}")
            elif kind == "resnet":
                for a, b in RESNET_PARTS:
                    take(f"{old}.{a}.{suffix}", f"{new}.{b}.{suffix}")
            else:
                heads = channels // cfg["attention_head_dim"]
                take(f"{old}.norm.{suffix}", f"{new}.group_norm.{suffix}")
                take(f"{old}.proj_out.{suffix}", f"{new}.to_out.0.{suffix}", squeeze=suffix == "weight")
                t = sd[f"{old}.qkv.{suffix}"]
                used.add(f"{old}.qkv.{suffix}")
                for name, part in zip(["to_q", "to_k", "to_v"], split_qkv(t, heads)):
                    out[f"{new}.{name}.{suffix}"] = part.reshape(channels, channels) if suffix == "weight" else part
    left = sorted(set(sd) - used)
    if left:
        raise Refused(f"{len(left)} UNet tensors have no place in UNet2DModel (first: {left[:4]}); is this an openaimodel UNetModel with the config given?")
    return out


def first_stage(sd, fs, image_size):
    """(class name, config, state dict) of the first stage."""
    target, p = fs["target"], fs["params"]
    dd = p["ddconfig"]
    channels = [dd["ch"] * m for m in dd["ch_mult"]]
    res = dd["resolution"]
    # As diffusers' create_vae_diffusers_config: a level has attention when its resolution is listed.
    down = ["AttnDownEncoderBlock2D" if res // 2**i in dd["attn_resolutions"] else "DownEncoderBlock2D" for i in range(len(channels))]
    up = ["AttnUpDecoderBlock2D" if res // 2**i in dd["attn_resolutions"] else "UpDecoderBlock2D" for i in range(len(channels))][::-1]
    if any("Attn" in t for t in down):
        raise Refused("first stages with attention outside the mid block are not supported")
    cfg = {
        "in_channels": dd["in_channels"], "out_channels": dd["out_ch"], "down_block_types": down, "up_block_types": up,
        "block_out_channels": channels, "layers_per_block": dd["num_res_blocks"], "latent_channels": dd["z_channels"],
        "norm_num_groups": 32, "sample_size": res,
    }
    weights = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in sd.items()}, cfg)
    if target.endswith("VQModelInterface") or target.endswith("VQModel"):
        weights["quantize.embedding.weight"] = sd["quantize.embedding.weight"]
        cfg.update({"_class_name": "VQModel", "num_vq_embeddings": p["n_embed"], "vq_embed_dim": p["embed_dim"]})
        return "VQModel", cfg, weights
    if target.endswith("AutoencoderKL"):
        if p["embed_dim"] != dd["z_channels"]:
            raise Refused(f"a KL first stage with embed_dim {p['embed_dim']} != z_channels {dd['z_channels']} has no diffusers AutoencoderKL")
        cfg["_class_name"] = "AutoencoderKL"
        return "AutoencoderKL", cfg, weights
    raise Refused(f"first stage {target} is not supported (VQModelInterface and AutoencoderKL are)")


def condition(params, unet_in, latent_channels):
    """ldm-web.json's `concat` entry for the config's condition stage."""
    cs = params.get("cond_stage_config")
    t = target_of(cs)
    base = {"range": [-1.0, 1.0], "resample": "bicubic"}
    if t == "__is_first_stage__":
        c = {"stage": "first_stage", "channels": params["first_stage_config"]["params"]["ddconfig"]["in_channels"], **base}
        cond_channels = latent_channels
    elif t.endswith("SpatialRescaler"):
        p = cs.get("params", {})
        if p.get("out_channels") is not None:
            raise Refused("SpatialRescaler with a channel remap (out_channels) is not supported")
        c = {"stage": "rescale", "channels": p.get("in_channels", 3), **base,
             "rescale": {"method": p.get("method", "bilinear"), "multiplier": p.get("multiplier", 0.5), "stages": p.get("n_stages", 1)}}
        cond_channels = c["channels"]
    elif t in ("torch.nn.Identity", "__is_unconditional__"):
        cond_channels = unet_in - latent_channels
        c = {"stage": "identity", "channels": cond_channels, **base}
    else:
        raise Refused(f"condition stage {t!r} is not supported (__is_first_stage__, SpatialRescaler, torch.nn.Identity are)")
    if latent_channels + cond_channels != unet_in:
        raise Refused(f"the UNet takes {unet_in} channels, the latents ({latent_channels}) and the condition ({cond_channels}) make {latent_channels + cond_channels}")
    if c["channels"] not in (1, 3):
        raise Refused(f"condition images of {c['channels']} channels are not supported (1 or 3)")
    return c


def read_checkpoint(path):
    if str(path).endswith(".safetensors"):
        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def convert(checkpoint, config_path, out_dir, half=False):
    config = yaml.safe_load(Path(config_path).read_text())
    params = config["model"]["params"]
    if params.get("conditioning_key") != "concat":
        raise Refused(f"conditioning_key is {params.get('conditioning_key')!r}; this converter handles concat models")
    if params.get("beta_schedule", "linear") != "linear" or params.get("given_betas"):
        raise Refused("only the linear beta schedule is supported")
    sd = read_checkpoint(checkpoint)
    unet_sd = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    fs_sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    if not unet_sd or not fs_sd:
        raise Refused("the checkpoint has no model.diffusion_model.* or first_stage_model.* tensors")
    ucfg, attn_levels = unet_config(params["unet_config"]["params"], params.get("image_size", 64))
    unet = convert_unet(unet_sd, ucfg, attn_levels)
    fs_class, fs_cfg, fs_weights = first_stage(fs_sd, params["first_stage_config"], params.get("image_size", 64))
    fs_cfg["scaling_factor"] = float(params.get("scale_factor", 1.0))
    latent_channels = fs_cfg["vq_embed_dim"] if fs_class == "VQModel" else fs_cfg["latent_channels"]
    cond = condition(params, ucfg["in_channels"], latent_channels)
    prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[params.get("parameterization", "eps")]
    # CompVis' DDIM sampler: timesteps 1, 1 + c, ...; the last step goes to alphas_cumprod[0].
    scheduler = {
        "_class_name": "DDIMScheduler", "num_train_timesteps": params.get("timesteps", 1000),
        "beta_start": params.get("linear_start", 0.0015), "beta_end": params.get("linear_end", 0.0155),
        "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "prediction_type": prediction, "timestep_spacing": "leading",
    }
    out = Path(out_dir)
    for d in ["unet", "vqvae", "scheduler"]:
        (out / d).mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    contiguous = lambda w: {k: v.to(dtype).contiguous() for k, v in w.items()}
    save_file(contiguous(unet), str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file(contiguous(fs_weights), str(out / "vqvae" / "diffusion_pytorch_model.safetensors"))
    write = lambda p, v: p.write_text(json.dumps(v, indent=2, sort_keys=True) + "\n")
    write(out / "unet" / "config.json", ucfg)
    write(out / "vqvae" / "config.json", fs_cfg)
    write(out / "scheduler" / "scheduler_config.json", scheduler)
    write(out / "model_index.json", {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", fs_class], "scheduler": ["diffusers", "DDIMScheduler"]})
    write(out / "ldm-web.json", {"concat": cond})
    return ucfg, fs_cfg, cond


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--config", required=True, help="the model's CompVis yaml config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--half", action="store_true", help="store the weights as float16 (half the download; ldm-web computes in f32 or f16 either way)")
    a = ap.parse_args()
    try:
        _, _, cond = convert(a.checkpoint, a.config, a.out, a.half)
    except Refused as e:
        sys.exit(f"convert_compvis_concat: {e}")
    print(f"wrote {a.out} (condition: {cond['stage']}, {cond['channels']} channels)")


if __name__ == "__main__":
    main()
