#!/usr/bin/env python3
"""Build tiny deterministic random-weight Stable Diffusion fixtures and diffusers' reference outputs.

Run through scripts/fixtures.sh (creates the venv, sets OMP_NUM_THREADS=1). Everything is built
offline from configs; no model hub is contacted. Re-running reproduces byte-identical files.

Outputs (see tests/fixtures/README.md):
  tests/fixtures/sd1/, tests/fixtures/sd2/      diffusers folders (StableDiffusionPipeline.save_pretrained)
  tests/fixtures/sd1.safetensors, sd2.safetensors  single-file checkpoints in the CompVis/Stability layout
  tests/fixtures/ref/                            diffusers reference outputs
"""

import json
import math
import os
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["DIFFUSERS_VERBOSITY"] = "error"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import regex  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.loaders.single_file_utils import (  # noqa: E402
    create_diffusers_clip_model_from_ldm,
    load_single_file_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
REF = FIX / "ref"

# --------------------------------------------------------------------------------------------
# Tokenizer: a tiny CLIP BPE vocabulary learned here from an embedded corpus
# --------------------------------------------------------------------------------------------

CORPUS = """
a photo of an astronaut riding a horse on mars, highly detailed, 4k.
A painting of a beautiful landscape with mountains, a lake and a forest at sunset.
Portrait of a young woman with long hair, studio lighting, sharp focus, trending on artstation.
A cute cat sitting on a wooden table next to a cup of coffee, soft light, bokeh.
An old castle on a hill under a starry night sky, digital art, concept art, octane render.
The city at night with neon lights and rain, cyberpunk style, cinematic, wide angle.
A red sports car driving on a mountain road, photorealistic, 8k, ultra detailed.
A bowl of fresh fruit on the kitchen counter, still life, oil painting, masterpiece.
An astronaut floating in space near the moon and the earth, high quality, detailed illustration.
A dog running on the beach with the ocean waves behind it, golden hour, photography.
It's a small house in the woods; we'll paint the walls blue and don't forget the garden.
Highly detailed fantasy art of a dragon flying over a medieval village, epic, dramatic lighting.
A watercolor painting of flowers in a vase, pastel colors, delicate, beautiful, soft.
Blurry, low quality, bad anatomy, worst quality, jpeg artifacts, watermark, text.
A photo of a horse standing in a green field with trees and clouds, landscape photography.
""".strip()

# GPT-2 / CLIP byte-to-unicode table (printable bytes map to themselves, the rest to 256+n).
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
NUM_MERGES = 300


def learn_bpe(text, num_merges):
    """Plain deterministic BPE: most frequent adjacent pair, ties broken by the smaller pair."""
    b2u = bytes_to_unicode()
    words = Counter(regex.findall(CLIP_PAT, text.lower()))
    seqs = {}
    for w in words:
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] = syms[-1] + "</w>"
        seqs[w] = syms
    base = list(b2u.values())
    vocab = base + [v + "</w>" for v in base]
    known = set(vocab)
    merges = []
    while len(merges) < num_merges:
        pairs = Counter()
        for w, syms in seqs.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += words[w]
        cands = [(-c, p) for p, c in pairs.items() if p[0] + p[1] not in known]
        if not cands:
            break
        _, best = min(cands)
        merges.append(best)
        tok = best[0] + best[1]
        known.add(tok)
        vocab.append(tok)
        for w, syms in seqs.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == best[0] and syms[i + 1] == best[1]:
                    out.append(tok)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            seqs[w] = out
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def write_tokenizer(folder, vocab, merges, pad_token):
    """vocab.json + merges.txt in the original CLIP/HF format (what the hub's SD tokenizers hold), then
    whatever transformers' save_pretrained writes (5.x: tokenizer.json + tokenizer_config.json), plus
    the legacy special_tokens_map.json that SD folders on the hub carry."""
    folder.mkdir(parents=True, exist_ok=True)
    vf, mf = folder / "vocab.json", folder / "merges.txt"
    vf.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    mf.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(vf), merges=str(mf), pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(str(folder))
    special = {
        k: {"content": v, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        for k, v in (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"))
    }
    special["pad_token"] = pad_token
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    return tok


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

# The brief asked for UNet block_out_channels (32, 64, 64) and VAE (16, 32, 32, 32); those weigh
# ~50 MB once stored as folder + single file + fp16 variant, so channels are halved (see README).
UNET_CHANNELS = (16, 32, 32)
UNET_GROUPS = 8
VAE_CHANNELS = (8, 16, 16, 16)
VAE_GROUPS = 4
HIDDEN = 32


def text_config(vocab, tok, act):
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=HIDDEN,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def make_unet(sd2):
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        norm_num_groups=UNET_GROUPS,
    )
    if sd2:
        return UNet2DConditionModel(
            **common,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            upcast_attention=True,
            transformer_layers_per_block=(2, 1, 1),  # asymmetric: up blocks read it reversed
        )
    return UNet2DConditionModel(**common, attention_head_dim=4)  # 4 heads: head dims 4 and 8 (the engine reads heads in vec4s, as every real SD model allows)


def make_vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CHANNELS,
        latent_channels=4,
        norm_num_groups=VAE_GROUPS,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=0.18215,
    )


SCHED_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    timestep_spacing="leading",
)


def make_scheduler(sd2):
    if sd2:
        return DDIMScheduler(**SCHED_COMMON, clip_sample=False, prediction_type="v_prediction")
    return PNDMScheduler(**SCHED_COMMON, skip_prk_steps=True, prediction_type="epsilon")


def make_sched(name, base):
    """The scheduler a test case names (`ldm generate --scheduler` names; None: `base`'s own class),
    built as a user switches schedulers, `Class.from_config(pipe.scheduler.config)`, with only the
    options the names imply: `base` is the scheduler of a pipeline already constructed (so
    carrying the fix-ups its __init__ applied). Keys the config lacks take the new class's
    defaults (a DDIM from SD1's PNDM config, which has no clip_sample, clips its x0)."""
    cfg = base.config
    return {
        None: lambda: base.__class__.from_config(cfg),
        "ddim": lambda: DDIMScheduler.from_config(cfg),
        "pndm": lambda: PNDMScheduler.from_config(cfg),
        "ddpm": lambda: DDPMScheduler.from_config(cfg),
        "euler": lambda: EulerDiscreteScheduler.from_config(cfg),
        "euler-a": lambda: EulerAncestralDiscreteScheduler.from_config(cfg),
        "heun": lambda: HeunDiscreteScheduler.from_config(cfg),
        "dpmpp-2m": lambda: DPMSolverMultistepScheduler.from_config(cfg),
        "dpmpp-2m-karras": lambda: DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True),
        "dpmpp-2m-sde-karras": lambda: DPMSolverMultistepScheduler.from_config(
            cfg, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
        ),
        "unipc": lambda: UniPCMultistepScheduler.from_config(cfg),
        "lcm": lambda: LCMScheduler.from_config(cfg),
        "lms": lambda: LMSDiscreteScheduler.from_config(cfg),
    }[name]()


@torch.no_grad()
def reinit(model, seed, emb_std=0.5):
    """Overwrite every parameter with seeded noise that keeps activations O(1):
    weights randn/sqrt(fan_in); biases 0.1*randn; norm weight 1+0.1*randn, norm bias 0.1*randn;
    embeddings emb_std*randn."""
    g = torch.Generator("cpu").manual_seed(seed)
    norm_params, emb_params = set(), set()
    for mname, m in model.named_modules():
        prefix = mname + "." if mname else ""
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            norm_params.update(prefix + n for n, _ in m.named_parameters(recurse=False))
        if isinstance(m, torch.nn.Embedding):
            emb_params.update(prefix + n for n, _ in m.named_parameters(recurse=False))
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name in norm_params:
            v = 1.0 + 0.1 * r if name.endswith("weight") else 0.1 * r
        elif name in emb_params:
            v = emb_std * r
        elif p.ndim == 1:
            v = 0.1 * r
        else:
            fan_in = p[0].numel()
            v = r / math.sqrt(fan_in)
        p.copy_(v)


# --------------------------------------------------------------------------------------------
# diffusers -> original (CompVis / Stability) single-file layout: inverse of
# diffusers/loaders/single_file_utils.py convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
# convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
# --------------------------------------------------------------------------------------------

RESNET_UNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def unet_to_ldm(sd, cfg):
    L = cfg["layers_per_block"]
    top = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        head, rest = ".".join(parts[:-1]), parts[-1]
        if head in top:
            nk = f"{top[head]}.{rest}"
        elif parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.w
                nk = f"input_blocks.{1 + b * (L + 1) + L}.0.op." + ".".join(parts[5:])
            else:
                j = int(parts[3])
                sub = ".".join(parts[4:])
                idx = 1 + b * (L + 1) + j
                if kind == "resnets":
                    nk = f"input_blocks.{idx}.0.{rename_resnet(sub)}"
                else:
                    nk = f"input_blocks.{idx}.1.{sub}"
        elif parts[0] == "mid_block":
            kind, j, sub = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                nk = f"middle_block.{2 * j}.{rename_resnet(sub)}"
            else:
                nk = f"middle_block.1.{sub}"
        elif parts[0] == "up_blocks":
            b, kind = int(parts[1]), parts[2]
            has_attn = cfg["up_block_types"][b].startswith("CrossAttn")
            if kind == "upsamplers":
                nk = f"output_blocks.{b * (L + 1) + L}.{2 if has_attn else 1}.conv." + ".".join(parts[5:])
            else:
                j = int(parts[3])
                sub = ".".join(parts[4:])
                idx = b * (L + 1) + j
                if kind == "resnets":
                    nk = f"output_blocks.{idx}.0.{rename_resnet(sub)}"
                else:
                    nk = f"output_blocks.{idx}.1.{sub}"
        else:
            raise KeyError(k)
        out["model.diffusion_model." + nk] = v
    return out


def rename_resnet(sub):
    for a, b in RESNET_UNET:
        if sub.startswith(a + "."):
            return b + sub[len(a):]
    raise KeyError(sub)


def vae_to_ldm(sd, cfg):
    n = len(cfg["up_block_types"])
    top = {
        "encoder.conv_in": "encoder.conv_in",
        "encoder.conv_out": "encoder.conv_out",
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_in": "decoder.conv_in",
        "decoder.conv_out": "decoder.conv_out",
        "decoder.conv_norm_out": "decoder.norm_out",
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
    }
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        head, rest = ".".join(parts[:-1]), parts[-1]
        side = parts[0]
        if head in top:
            nk = f"{top[head]}.{rest}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            b, kind = int(parts[2]), parts[3]
            lb = b if parts[1] == "down_blocks" else n - 1 - b
            lname = "down" if parts[1] == "down_blocks" else "up"
            if kind in ("downsamplers", "upsamplers"):
                nk = f"{side}.{lname}.{lb}.{lname}sample.conv.{rest}"
            else:
                sub = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                nk = f"{side}.{lname}.{lb}.block.{parts[4]}.{sub}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                sub = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                nk = f"{side}.mid.block_{int(parts[3]) + 1}.{sub}"
            else:  # mid_block.attentions.0.<name>.w
                name = ".".join(parts[4:-1])
                nk = f"{side}.mid.attn_1.{attn[name]}.{rest}"
                if v.ndim == 2:  # Linear -> 1x1 conv as in the original checkpoints
                    v = v[:, :, None, None]
        else:
            raise KeyError(k)
        out["first_stage_model." + nk] = v
    return out


def clip_to_ldm(sd):
    """HF CLIP (SD1): cond_stage_model.transformer.text_model.* (the transformers <5.6 layout)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        out["cond_stage_model.transformer.text_model." + k] = v
    return out


def open_clip_to_ldm(sd, cfg, extra_layer, g):
    """HF CLIP (SD2) -> OpenCLIP cond_stage_model.model.* with fused qkv in_proj.

    A real SD2 OpenCLIP tower has one more resblock than the diffusers text encoder (24 vs 23):
    SD2 conditions on the penultimate layer, and diffusers drops resblocks.23. `extra_layer`
    is that last, unused resblock (seeded noise)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    P = "cond_stage_model.model."
    out = {
        P + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        P + "positional_embedding": sd["embeddings.position_embedding.weight"],
    }
    nl = cfg.num_hidden_layers
    for i in range(nl + 1):
        if i < nl:
            e = f"encoder.layers.{i}."
            L = {kk[len(e):]: vv for kk, vv in sd.items() if kk.startswith(e)}
        else:
            L = extra_layer
        r = P + f"transformer.resblocks.{i}."
        out[r + "ln_1.weight"] = L["layer_norm1.weight"]
        out[r + "ln_1.bias"] = L["layer_norm1.bias"]
        out[r + "attn.in_proj_weight"] = torch.cat(
            [L["self_attn.q_proj.weight"], L["self_attn.k_proj.weight"], L["self_attn.v_proj.weight"]], 0
        )
        out[r + "attn.in_proj_bias"] = torch.cat(
            [L["self_attn.q_proj.bias"], L["self_attn.k_proj.bias"], L["self_attn.v_proj.bias"]], 0
        )
        out[r + "attn.out_proj.weight"] = L["self_attn.out_proj.weight"]
        out[r + "attn.out_proj.bias"] = L["self_attn.out_proj.bias"]
        out[r + "ln_2.weight"] = L["layer_norm2.weight"]
        out[r + "ln_2.bias"] = L["layer_norm2.bias"]
        out[r + "mlp.c_fc.weight"] = L["mlp.fc1.weight"]
        out[r + "mlp.c_fc.bias"] = L["mlp.fc1.bias"]
        out[r + "mlp.c_proj.weight"] = L["mlp.fc2.weight"]
        out[r + "mlp.c_proj.bias"] = L["mlp.fc2.bias"]
    out[P + "ln_final.weight"] = sd["final_layer_norm.weight"]
    out[P + "ln_final.bias"] = sd["final_layer_norm.bias"]
    # OpenCLIP stores x @ text_projection ([width, embed_dim]); unused by SD and ignored by diffusers.
    out[P + "text_projection"] = torch.randn(HIDDEN, HIDDEN, generator=g) / math.sqrt(HIDDEN)
    out[P + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out


def ddpm_buffers(sched_cfg):
    """The DDPM schedule buffers that real LDM checkpoints carry at top level (ignored by loaders)."""
    betas = (
        torch.linspace(sched_cfg["beta_start"] ** 0.5, sched_cfg["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    )
    ac = torch.cumprod(1 - betas, 0)
    acp = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return {
        "betas": betas.float(),
        "alphas_cumprod": ac.float(),
        "alphas_cumprod_prev": acp.float(),
    }


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def save_tensors(path, tensors):
    out = {}
    for k, v in tensors.items():
        if not torch.is_tensor(v):
            v = torch.from_numpy(v)
        v = v.detach().cpu().contiguous()
        if v.is_floating_point():
            v = v.float()
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt"})


def assert_same(a, b, what):
    ka, kb = set(a), set(b)
    if ka != kb:
        raise AssertionError(f"{what}: key mismatch: only-a {sorted(ka - kb)[:8]} only-b {sorted(kb - ka)[:8]}")
    for k in sorted(ka):
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
            raise AssertionError(f"{what}: tensor {k} differs")


def shim_clip_skip(pipe):
    """diffusers 0.42.1 encode_prompt(clip_skip=...) calls text_encoder.text_model.final_layer_norm, but
    transformers >= 5.6 flattened CLIPTextModel (no .text_model) -> AttributeError. Give it the
    attribute it expects (plain attribute, not a registered submodule), same LayerNorm."""
    te = pipe.text_encoder
    if not hasattr(te, "text_model"):
        object.__setattr__(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm))
    return pipe


def json_safe(x):
    """Strict JSON: non-finite floats (DPMSolver's lambda_min_clipped = -inf) become strings "inf"/"-inf"."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def stats(name, t):
    t = t.float()
    print(f"  {name}: shape {list(t.shape)} mean {t.mean():+.4f} std {t.std():.4f} min {t.min():+.3f} max {t.max():+.3f}")


PROMPTS = [
    "",
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF AN ASTRONAUT RIDING A HORSE ON MARS",
    "  a   photo\tof an\n\nastronaut  \t riding   ",
    "hello, world!!! ...",
    "1234 56.7",
    "it's we'll don't they're I'm you've he'd",
    "café naïve Ünïcödé",
    "東京の夜景",
    "🚀🌕 rocket 👩‍🚀",
    "&amp; <b>bold</b> &lt;3",
    "highly detailed, 4k, trending on artstation, octane render, cinematic lighting",
    "blurry, low quality",
    None,  # > 77 tokens (filled below)
    None,  # exactly 75 tokens (filled below)
]
LONG_PROMPT = (
    "a highly detailed digital painting of an old castle on a hill under a starry night sky, "
    "with a dragon flying over a medieval village, epic dramatic lighting, concept art, octane render, "
    "trending on artstation, sharp focus, golden hour, wide angle, cinematic, masterpiece, 8k, ultra detailed, "
    "a red sports car driving on a mountain road next to a lake and a forest at sunset"
)
TEXT_REF_PROMPTS = [1, 0, 13]  # plain (padded), empty (all padding), long (truncated)


def fill_prompts(tok):
    def n(p):
        return len(tok(p, add_special_tokens=False).input_ids)

    prompts = list(PROMPTS)
    assert n(LONG_PROMPT) > 75, n(LONG_PROMPT)
    prompts[13] = LONG_PROMPT
    words = "a photo of an astronaut riding a horse on mars highly detailed".split()
    p, i = "", 0
    while True:
        cand = (p + " " + words[i % len(words)]).strip()
        if n(cand) > 75:
            break
        p, i = cand, i + 1
    while n(p) < 75:
        p += " a"
    assert n(p) == 75
    prompts[14] = p
    return prompts


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def build_folder(name, sd2, vocab, merges, seed_base):
    folder = FIX / name
    tok = write_tokenizer(folder / "tokenizer", vocab, merges, "!" if sd2 else "<|endoftext|>")

    torch.manual_seed(seed_base + 1)
    te = CLIPTextModel(text_config(vocab, tok, "gelu" if sd2 else "quick_gelu"))
    reinit(te, seed_base + 1)
    torch.manual_seed(seed_base + 2)
    unet = make_unet(sd2)
    reinit(unet, seed_base + 2)
    torch.manual_seed(seed_base + 3)
    vae = make_vae()
    reinit(vae, seed_base + 3)
    with torch.no_grad():  # fewer decoded pixels outside [-1, 1] (clipped in the pipeline's images)
        vae.decoder.conv_out.weight.mul_(0.5)
    for m in (te, unet, vae):
        m.eval()

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=make_scheduler(sd2),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    built = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in
             (("text_encoder", te), ("unet", unet), ("vae", vae))}
    extra_layer = None
    if not sd2:
        # transformers 5.x writes CLIPTextModel keys without the "text_model." prefix; every SD folder on
        # the hub (written by transformers < 5.6) has it. Store sd1 in that legacy layout (transformers
        # still loads it: PrefixChange) and keep sd2 in the 5.x layout, so loaders get tested on both.
        f = folder / "text_encoder" / "model.safetensors"
        legacy = {"text_model." + k: v for k, v in load_file(str(f)).items()}
        save_file({k: legacy[k] for k in sorted(legacy)}, str(f), metadata={"format": "pt"})
    if sd2:
        # fp16 variant of the UNet next to the fp32 file
        unet16 = make_unet(True)
        unet16.load_state_dict(unet.state_dict())
        unet16.to(torch.float16).save_pretrained(str(folder / "unet"), safe_serialization=True, variant="fp16")
        # sharded text encoder
        shutil.rmtree(folder / "text_encoder")
        te.save_pretrained(str(folder / "text_encoder"), safe_serialization=True, max_shard_size="100KB")
        shards = sorted(p.name for p in (folder / "text_encoder").glob("model-*.safetensors"))
        assert (folder / "text_encoder" / "model.safetensors.index.json").exists() and len(shards) >= 2, shards
        # the unused last OpenCLIP resblock for the single file
        torch.manual_seed(seed_base + 4)
        extra = CLIPTextModel(text_config(vocab, tok, "gelu"))
        reinit(extra, seed_base + 4)
        extra_layer = {
            k.removeprefix("text_model.").removeprefix("encoder.layers.2."): v
            for k, v in extra.state_dict().items()
            if "encoder.layers.2." in k
        }
    return folder, extra_layer, built


def write_single_file(name, folder, sd2, extra_layer):
    unet_sd = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    vae_sd = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    te = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    te_sd = {k: v.contiguous() for k, v in te.state_dict().items()}
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())

    ckpt = {}
    ckpt.update(unet_to_ldm(unet_sd, unet_cfg))
    ckpt.update(vae_to_ldm(vae_sd, vae_cfg))
    if sd2:
        ckpt.update(open_clip_to_ldm(te_sd, te.config, extra_layer, gen(1234)))
    else:
        ckpt.update(clip_to_ldm(te_sd))
        ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ckpt.update(ddpm_buffers(sched_cfg))
    ckpt = {k: ckpt[k].contiguous() for k in sorted(ckpt)}
    path = FIX / f"{name}.safetensors"
    save_file(ckpt, str(path))
    return path


def verify_single_file(path, folder, sd2):
    """Load the single file back with diffusers' own conversion and compare with the folder."""
    u = UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet", local_files_only=True)
    assert_same(
        {k: v for k, v in u.state_dict().items()},
        load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")),
        f"{path.name} unet",
    )
    v = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae", local_files_only=True)
    assert_same(v.state_dict(), load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")), f"{path.name} vae")
    ref_te = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).state_dict()
    # transformers models have no from_single_file; this is the function the pipeline loader uses for them
    t = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, load_single_file_checkpoint(str(path)), subfolder="text_encoder", config=str(folder),
        local_files_only=True,
    )
    assert_same(
        {k: x for k, x in t.state_dict().items()}, {k: x for k, x in ref_te.items()}, f"{path.name} text_encoder"
    )
    # whole pipeline
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    ref = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    for comp in ("unet", "vae", "text_encoder"):
        assert_same(getattr(pipe, comp).state_dict(), getattr(ref, comp).state_dict(), f"{path.name} pipeline {comp}")
    assert type(pipe.scheduler) is type(ref.scheduler), (type(pipe.scheduler), type(ref.scheduler))
    assert dict(pipe.scheduler.config) == dict(ref.scheduler.config), "scheduler config differs"
    assert pipe.tokenizer.get_vocab() == ref.tokenizer.get_vocab() and pipe.tokenizer.pad_token == ref.tokenizer.pad_token
    print(f"  {path.name}: per-component and pipeline from_single_file match the folder")
    return pipe


def main():
    for p in [FIX / "sd1", FIX / "sd2", REF, FIX / "sd1.safetensors", FIX / "sd2.safetensors"]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    REF.mkdir(parents=True)

    vocab, merges = learn_bpe(CORPUS, NUM_MERGES)
    print(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges")

    print("building sd1 / sd2 folders")
    f1, _, built1 = build_folder("sd1", False, vocab, merges, 100)
    f2, extra, built2 = build_folder("sd2", True, vocab, merges, 200)

    # Load both the way a user would.
    p1 = StableDiffusionPipeline.from_pretrained(str(f1), dtype=torch.float32)
    p2 = StableDiffusionPipeline.from_pretrained(str(f2), variant=None, dtype=torch.float32)
    pipes = {"sd1": p1, "sd2": p2}
    for name, p, built in (("sd1", p1, built1), ("sd2", p2, built2)):
        for comp, sd in built.items():
            assert_same(getattr(p, comp).state_dict(), sd, f"{name} from_pretrained {comp}")
        # the tokenizer built from vocab.json + merges.txt alone must agree with the saved folder's
        alone = CLIPTokenizer(
            vocab=str(FIX / name / "tokenizer" / "vocab.json"), merges=str(FIX / name / "tokenizer" / "merges.txt"),
            pad_token=p.tokenizer.pad_token, model_max_length=77,
        )
        for pr in PROMPTS[:13] + [LONG_PROMPT]:
            kw = dict(padding="max_length", max_length=77, truncation=True)
            assert alone(pr, **kw).input_ids == p.tokenizer(pr, **kw).input_ids, (name, pr)
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
        shim_clip_skip(p)
    fp32 = load_file(str(f2 / "unet" / "diffusion_pytorch_model.safetensors"))
    fp16 = load_file(str(f2 / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    loaded = p2.unet.state_dict()
    picked_fp32 = all(torch.equal(loaded[k], fp32[k]) for k in fp32)
    picked_fp16 = all(torch.equal(loaded[k], fp16[k].float()) for k in fp16)
    print(f"sd2 from_pretrained(variant=None) unet == fp32 file: {picked_fp32}; == fp16 file upcast: {picked_fp16}")
    assert picked_fp32 and not picked_fp16

    # ---- single files
    print("single-file checkpoints")
    s1 = write_single_file("sd1", f1, False, None)
    s2 = write_single_file("sd2", f2, True, extra)
    ps1 = verify_single_file(s1, f1, False)
    ps1.set_progress_bar_config(disable=True)
    shim_clip_skip(ps1)
    ps2 = verify_single_file(s2, f2, True)
    ps2.set_progress_bar_config(disable=True)
    shim_clip_skip(ps2)

    # ---- tokens
    print("tokens")
    tokens = {}
    prompts = fill_prompts(p1.tokenizer)
    for name, p in pipes.items():
        tokens[name] = []
        for pr in prompts:
            ids = p.tokenizer(pr, padding="max_length", max_length=77, truncation=True).input_ids
            assert len(ids) == 77
            tokens[name].append({"prompt": pr, "ids": ids})
    (REF / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False, indent=1, allow_nan=False) + "\n", encoding="utf-8")

    # ---- text encoder
    print("text encoder")
    for name, p in pipes.items():
        out = {}
        with torch.no_grad():
            for i in TEXT_REF_PROMPTS:
                ids = torch.tensor([tokens[name][i]["ids"]], dtype=torch.long)
                out[f"ids_{i}"] = ids.to(torch.int32)
                out[f"hidden_{i}"] = p.text_encoder(ids)[0]
                hs = p.text_encoder(ids, output_hidden_states=True)
                for skip in (1, 2):
                    # StableDiffusionPipeline.encode_prompt: hidden_states[-(clip_skip + 1)] then final_layer_norm
                    out[f"skip{skip}_{i}"] = p.text_encoder.final_layer_norm(hs[-1][-(skip + 1)])
                # cross-check with the pipeline's own encode_prompt
                emb, _ = p.encode_prompt(tokens[name][i]["prompt"], "cpu", 1, False, clip_skip=2)
                assert torch.equal(emb, out[f"skip2_{i}"]), "encode_prompt clip_skip mismatch"
                emb, _ = p.encode_prompt(tokens[name][i]["prompt"], "cpu", 1, False)
                assert torch.equal(emb, out[f"hidden_{i}"])
        stats(f"{name} hidden_1", out["hidden_1"])
        save_tensors(REF / f"text_encoder_{name}.safetensors", out)

    # ---- unet
    print("unet")
    for name, p in pipes.items():
        g = gen(11)
        sample = torch.randn(2, 4, 8, 12, generator=g)
        ehs = torch.randn(2, 77, HIDDEN, generator=g)
        t = torch.tensor([981.0])
        with torch.no_grad():
            out = {"sample": sample, "timestep": t, "encoder_hidden_states": ehs}
            out["out"] = p.unet(sample, t, ehs).sample
            stats(f"{name} unet out", out["out"])
            if name == "sd2":
                u16 = UNet2DConditionModel.from_pretrained(
                    str(f2), subfolder="unet", variant="fp16", dtype=torch.float32
                )
                assert all(u16.state_dict()[k].dtype == torch.float32 for k in fp16)
                assert all(torch.equal(u16.state_dict()[k], fp16[k].float()) for k in fp16)
                out["out_fp16_variant"] = u16(sample, t, ehs).sample
                d = (out["out_fp16_variant"] - out["out"]).abs().max()
                print(f"  sd2 fp16-variant vs fp32 max |diff| {d:.3e}")
        save_tensors(REF / f"unet_{name}.safetensors", out)

    # ---- vae
    print("vae")
    for name, p in pipes.items():
        g = gen(12)
        lat = torch.randn(1, 4, 6, 8, generator=g)
        img = torch.rand(1, 3, 48, 64, generator=g) * 2 - 1
        with torch.no_grad():
            dec = p.vae.decode(lat).sample
            dist = p.vae.encode(img).latent_dist
            sampled = dist.sample(generator=gen(7))
        stats(f"{name} decoded", dec)
        stats(f"{name} mean", dist.mean)
        stats(f"{name} logvar", dist.logvar)
        save_tensors(
            REF / f"vae_{name}.safetensors",
            {"latents": lat, "decoded": dec, "image": img, "mean": dist.mean, "logvar": dist.logvar, "sampled": sampled},
        )

    # ---- randn
    print("randn")
    rnd = {}
    for seed, shape in [(0, [1]), (0, [7]), (1, [15]), (2, [16]), (3, [17]), (42, [1, 4, 8, 8]), (2**40 + 5, [3, 5]), (123, [2, 4, 6, 9])]:
        rnd[f"seed{seed}_shape{'x'.join(map(str, shape))}"] = torch.randn(shape, generator=gen(seed))
    g = gen(5)
    for i, shape in enumerate([[2, 3], [1, 4, 4, 4], [5]]):
        rnd[f"seq_{i}"] = torch.randn(shape, generator=g)
    save_tensors(REF / "randn.safetensors", rnd)

    # ---- pipelines
    all_pipes = dict(pipes)
    all_pipes["sd1.safetensors"] = ps1
    all_pipes["sd2.safetensors"] = ps2
    run_pipeline_cases(all_pipes, p1, None)
    print("done")


def run_pipeline_cases(all_pipes, p1, only):
    """Runs the whole-pipeline cases (all, or the indices in `only`, replacing their entries in
    ref/pipelines.json) and writes their images."""
    print("pipelines")
    astro = "a photo of an astronaut riding a horse on mars"
    cases = [
        dict(model="sd1", scheduler=None, seed=0, steps=5, width=64, height=64),
        dict(model="sd1", scheduler="euler-a", seed=1, steps=5, width=96, height=64, negative_prompt="blurry, low quality"),
        dict(model="sd1", scheduler="dpmpp-2m-sde-karras", seed=2, steps=5, width=64, height=96, batch=2),
        dict(model="sd2", scheduler=None, seed=3, steps=5, width=96, height=64, eta=0.5),
        dict(model="sd2", scheduler="unipc", seed=4, steps=5, width=64, height=64, guidance=1.0),
        dict(model="sd1", scheduler="lcm", seed=5, steps=4, width=64, height=64, guidance=1.5),
        dict(model="sd1", scheduler="euler", seed=6, steps=5, width=64, height=64, guidance_rescale=0.7),
        dict(model="sd2", scheduler="heun", seed=7, steps=4, width=64, height=64, clip_skip=1),
        dict(model="sd1.safetensors", scheduler="dpmpp-2m-karras", seed=8, steps=5, width=64, height=64),
        dict(model="sd1", scheduler="ddim", seed=9, steps=5, width=64, height=64, negative_prompt="blurry, low quality", clip_skip=2),
        dict(model="sd1", scheduler="ddpm", seed=10, steps=5, width=64, height=64),
        dict(model="sd2", scheduler="dpmpp-2m", seed=11, steps=5, width=64, height=64, negative_prompt="blurry, low quality"),
        dict(model="sd2", scheduler="euler-a", seed=12, steps=5, width=64, height=96, batch=2, guidance=5.0),
        dict(model="sd2", scheduler="pndm", seed=13, steps=5, width=64, height=64, prompt=""),
        dict(model="sd2", scheduler="lms", seed=14, steps=5, width=96, height=64, negative_prompt="blurry, low quality"),
        dict(model="sd2.safetensors", scheduler="euler", seed=15, steps=5, width=64, height=64),
    ]
    entries = json.loads((REF / "pipelines.json").read_text()) if only is not None else []
    for idx, c in enumerate(cases):
        if only is not None and idx not in only:
            continue
        base = all_pipes[c["model"]]
        s = c["scheduler"]
        # As a user switches: the pipeline as loaded, then pipe.scheduler = X.from_config(pipe.scheduler.config).
        pipe = StableDiffusionPipeline(**base.components)
        sched = make_sched(s, pipe.scheduler)
        pipe.scheduler = sched
        shim_clip_skip(pipe)
        pipe.set_progress_bar_config(disable=True)
        e = {
            "index": idx,
            "model": c["model"],
            "scheduler": s,
            "scheduler_class": type(sched).__name__,
            "scheduler_config": json_safe(
                {k: v for k, v in sorted(dict(sched.config).items()) if k != "_use_default_values"}
            ),
            "prompt": c.get("prompt", astro),
            "negative_prompt": c.get("negative_prompt"),
            "seed": c["seed"],
            "steps": c["steps"],
            "guidance": c.get("guidance", 7.5),
            "guidance_rescale": c.get("guidance_rescale", 0.0),
            "width": c["width"],
            "height": c["height"],
            "eta": c.get("eta", 0.0),
            "clip_skip": c.get("clip_skip"),
            "batch": c.get("batch", 1),
        }
        with torch.no_grad():
            img = pipe(
                prompt=e["prompt"],
                negative_prompt=e["negative_prompt"],
                num_inference_steps=e["steps"],
                guidance_scale=e["guidance"],
                guidance_rescale=e["guidance_rescale"],
                width=e["width"],
                height=e["height"],
                eta=e["eta"],
                clip_skip=e["clip_skip"],
                num_images_per_prompt=e["batch"],
                generator=gen(e["seed"]),
                output_type="np",
            ).images
        img = torch.from_numpy(img).float()
        assert list(img.shape) == [e["batch"], e["height"], e["width"], 3]
        e["timesteps"] = [float(t) for t in sched.timesteps]
        stats(f"case {idx} {c['model']} {s} image", img)
        save_tensors(REF / f"pipeline_{idx}.safetensors", {"image": img})
        if only is None:
            entries.append(e)
        else:
            entries[idx] = e
        if c["model"] == "sd1.safetensors":
            # same run from the folder pipeline must agree exactly
            pf = StableDiffusionPipeline(**{**p1.components, "scheduler": sched.__class__.from_config(sched.config)})
            pf.set_progress_bar_config(disable=True)
            with torch.no_grad():
                img2 = pf(
                    prompt=e["prompt"], num_inference_steps=e["steps"], guidance_scale=e["guidance"],
                    width=e["width"], height=e["height"], generator=gen(e["seed"]), output_type="np",
                ).images
            assert torch.equal(torch.from_numpy(img2).float(), img), "single-file vs folder pipeline differ"
    (REF / "pipelines.json").write_text(json.dumps(entries, indent=1, allow_nan=False) + "\n")


def rerun_pipelines(only):
    """`--pipelines 9,10`: reruns those pipeline cases from the committed folders and single files
    (the rest of the fixtures are left as they are)."""
    f1, f2 = FIX / "sd1", FIX / "sd2"
    p1 = shim_clip_skip(StableDiffusionPipeline.from_pretrained(str(f1), dtype=torch.float32))
    p2 = shim_clip_skip(StableDiffusionPipeline.from_pretrained(str(f2), variant=None, dtype=torch.float32))
    single = lambda f, folder: shim_clip_skip(StableDiffusionPipeline.from_single_file(
        str(f), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False))
    all_pipes = {"sd1": p1, "sd2": p2, "sd1.safetensors": single(FIX / "sd1.safetensors", f1), "sd2.safetensors": single(FIX / "sd2.safetensors", f2)}
    for p in all_pipes.values():
        p.set_progress_bar_config(disable=True)
    run_pipeline_cases(all_pipes, p1, only)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--pipelines":
        sys.exit(rerun_pipelines({int(i) for i in sys.argv[2].split(",")}))
    sys.exit(main())
