#!/usr/bin/env python3
"""Tiny random-weight fixtures of the latent diffusion paper's own model family (CompVis LDMs), with
diffusers' reference outputs. Run through scripts/fixtures.sh (one thread: byte-reproducible).

Outputs (see tests/fixtures/README.md):
  tests/fixtures/ldm/vqvae/            a diffusers VQModel folder (two blocks: f=2, 3 latent channels)
  tests/fixtures/ldm/uncond/           LDMPipeline (UNet2DModel with self-attention blocks + VQModel, DDIM)
  tests/fixtures/ldm/superres/         LDMSuperResolutionPipeline (6-channel UNet2DModel, scale-shift resnets, VQModel)
  tests/fixtures/ldm/text2im/          LDMTextToImagePipeline (LDMBert + BERT WordPiece vocab, UNet2DConditionModel, AutoencoderKL)
  tests/fixtures/ldm/unet_class_*/     UNet2DModels with class embeddings (timestep / table / identity)
  tests/fixtures/ldm/lowres.png        the super-resolution input (32x64 RGB)
  tests/fixtures/ref/vqmodel.safetensors  latents and VQModel.decode outputs, quantised and not
  tests/fixtures/ref/ldm_pipelines.safetensors  every pipeline case's output_type="np" images
  tests/fixtures/ref/ldm_models.safetensors     UNet2DModel and LDMBert outputs on fixed inputs
  tests/fixtures/ref/ldm_cases.json, bert_tokens.json  the cases' settings; BertTokenizer ids of 40 prompts
"""

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DIFFUSERS_VERBOSITY"] = "error"

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL, DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LDMPipeline,
    LDMSuperResolutionPipeline, LDMTextToImagePipeline, PNDMScheduler, UNet2DConditionModel, UNet2DModel, VQModel,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import reinit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
REF = FIX / "ref"


def save_tensors(path, tensors):
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def vqmodel():
    torch.manual_seed(20)
    vq = VQModel(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=3, num_vq_embeddings=48, norm_num_groups=8,
        vq_embed_dim=3, scaling_factor=1.0, sample_size=16,
    ).eval()
    # diffusers initialises the codebook uniformly in +-1/n: spread it so nearest-code choices matter.
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(0.0, 1.0)
    folder = FIX / "ldm" / "vqvae"
    vq.save_pretrained(str(folder), safe_serialization=True)
    g = torch.Generator().manual_seed(21)
    latents = torch.randn(2, 3, 6, 10, generator=g)  # batch 2, non-square
    with torch.no_grad():
        quantised = vq.decode(latents).sample
        raw = vq.decode(latents, force_not_quantize=True).sample
        codes = vq.quantize(latents)[2][2]
    save_tensors(REF / "vqmodel.safetensors", {"latents": latents, "decoded": quantised, "decoded_unquantized": raw, "codes": codes.float()})
    print(f"vqmodel: decoded {tuple(quantised.shape)}, codes used {codes.unique().numel()} of 48")


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


# CompVis/ldm-celebahq-256's scheduler (DDIM on a scaled-linear schedule, no clipping).
LDM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False)


def tiny_vq(seed, latent_channels=3):
    torch.manual_seed(seed)
    vq = VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=latent_channels, num_vq_embeddings=64, norm_num_groups=8,
        vq_embed_dim=latent_channels, scaling_factor=0.8, sample_size=16,
    ).eval()
    with torch.no_grad():
        reinit(vq, seed)
        vq.quantize.embedding.weight.normal_(0.0, 1.0, generator=gen(seed + 1))
        vq.decoder.conv_out.weight.mul_(0.5)
    return vq


def tiny_unet2d(seed, **kw):
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8,
    )
    cfg.update(kw)
    unet = UNet2DModel(**cfg).eval()
    with torch.no_grad():
        reinit(unet, seed)
    return unet


# Prompts for the BERT tokenizer: words of the vocabulary, word pieces, punctuation, case, accents,
# CJK, control characters, special tokens, over-long text.
BERT_PROMPTS = [
    "", "a painting of a squirrel eating a burger", "A Painting Of A Squirrel", "squirrels, burgers & paintings!",
    "an astronaut riding a horse on mars", "unknownword", "café naïve résumé", "über straße", "painting's painter",
    "a\tb\nc  d", "[MASK] is [SEP] [CLS] [PAD] [UNK]", "[mask] lower-case specials", "hello\u0000world\ufffd",
    "\u4e2d\u6587 \u65e5\u672c\u8a9e", "\u3053\u3093\u306b\u3061\u306f", "emoji \U0001F600 \U0001F34E", "numbers 123 4.5 6,7",
    "x" * 120, "painting " * 50, "a.b,c;d:e?f!g", "\u00bfqu\u00e9?", "\u2014dash\u2013", "\u201cquoted\u201d", "tab\u000bvt",
    "zero\u200bwidth", "soft\u00adhyphen", "\U0002B820 \U0002B920", "ﬁne ligature", "İstanbul", "ΣΑΣ", "burgerburger",
    "a photo of a cat", "A PHOTO OF A DOG.", "   leading and trailing   ", "mars-rover", "#hashtag @user", "a\u0301e\u0301",
    "\u00c5ngstr\u00f6m", "the", "squirrel" * 3,
]
BERT_WORDS = ("a an the of on with and is photo painting paint squirrel eating burger astronaut riding horse mars cat dog "
              "cafe naive resume uber strasse hello world numbers x quoted dash fine istanbul σας lower case specials "
              "emoji user rover hashtag leading trailing angstrom qu e tab vt zero width soft hyphen").split()


def bert_vocab():
    pieces = ["##s", "##ing", "##er", "##rel", "##s", "##'", "##e", "##a", "##r", "##t", "##n", "##g", "##b"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:?!&'-#@\u00bf\u2014\u2013\u201c\u201d\u4e2d\u6587")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for t in BERT_WORDS + pieces + chars:
        if t not in vocab:
            vocab.append(t)
    return vocab


def save_pipeline(pipe, name):
    """Saves the pipeline and loads it back as a user would: the cases run on the loaded copy (a
    scheduler swapped with from_config on an in-memory one keeps the new class's defaults for the
    keys it was built without, one loaded from disk does not)."""
    folder = FIX / "ldm" / name
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    loaded = type(pipe).from_pretrained(str(folder))
    loaded.set_progress_bar_config(disable=True)
    return loaded


# The case tables' scheduler names (ldm-web's --scheduler names); "ddim" is the pipelines' own.
SCHEDULERS = {"euler": EulerDiscreteScheduler, "euler-a": EulerAncestralDiscreteScheduler, "pndm": PNDMScheduler}


def run(pipe, seed, sched="ddim", **kw):
    """The LDM pipelines do not pass their generator to scheduler.step: DDIM's eta noise and the
    ancestral samplers' noise come from torch's global generator. Seeding it with the same seed
    is ldm-web's definition of these pipelines' randomness. `sched` swaps the scheduler for the run."""
    base = pipe.scheduler
    if sched != "ddim":
        pipe.scheduler = SCHEDULERS[sched].from_config(base.config)
    try:
        torch.manual_seed(seed)
        return pipe(generator=gen(seed), output_type="np", **kw).images
    finally:
        pipe.scheduler = base


def ldm_pipelines():
    out, cases, models = {}, [], {}

    # LDMPipeline: UNet2DModel with self-attention down/up/mid blocks, VQModel (f=2).
    unet = tiny_unet2d(30)
    uncond = save_pipeline(LDMPipeline(vqvae=tiny_vq(31), unet=unet, scheduler=DDIMScheduler(**LDM_SCHEDULER)), "uncond")
    for i, (sched, steps, eta, batch, seed) in enumerate([("ddim", 4, 0.0, 2, 1), ("ddim", 3, 0.7, 1, 2), ("euler", 3, 0.0, 1, 3)]):
        img = run(uncond, seed, sched, batch_size=batch, num_inference_steps=steps, eta=eta)
        key = f"uncond_{i}"
        out[key] = torch.from_numpy(img)
        cases.append({"key": key, "model": "uncond", "scheduler": sched, "steps": steps, "eta": eta, "batch": batch, "seed": seed})

    # UNet2DModel forward outputs: the pipeline's UNet, and class-conditional variants.
    x = torch.randn(2, 3, 8, 16, generator=gen(40))
    with torch.no_grad():
        models["unet2d_sample"] = x
        models["unet2d_out"] = unet(x, 500).sample
    variants = {
        "unet_class_timestep": dict(class_embed_type="timestep", resnet_time_scale_shift="scale_shift"),
        "unet_class_table": dict(num_class_embeds=5, mid_block_scale_factor=1.4142, downsample_padding=0, attn_norm_num_groups=4),
        "unet_class_identity": dict(class_embed_type="identity", attention_head_dim=None, center_input_sample=True, add_attention=False),
    }
    labels = {"unet_class_timestep": torch.tensor([20.0, 350.0]), "unet_class_table": torch.tensor([3, 0]), "unet_class_identity": torch.randn(2, 64, generator=gen(41))}
    for j, (name, kw) in enumerate(variants.items()):
        u = tiny_unet2d(50 + j, **kw)
        folder = FIX / "ldm" / name
        if folder.exists():
            shutil.rmtree(folder)
        u.save_pretrained(str(folder), safe_serialization=True)
        with torch.no_grad():
            models[f"{name}_labels"] = labels[name].float()
            models[f"{name}_out"] = u(x, 250, class_labels=labels[name]).sample

    # LDMSuperResolutionPipeline: 6-channel UNet2DModel with scale-shift resnets, VQModel (f=2).
    sr_unet = tiny_unet2d(60, in_channels=6, resnet_time_scale_shift="scale_shift")
    sr = save_pipeline(LDMSuperResolutionPipeline(vqvae=tiny_vq(61), unet=sr_unet, scheduler=DDIMScheduler(**LDM_SCHEDULER)), "superres")
    g = gen(62)
    low = (torch.rand(32, 64, 3, generator=g) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(low).save(FIX / "ldm" / "lowres.png")
    low_img = Image.open(FIX / "ldm" / "lowres.png").convert("RGB")
    for i, (sched, steps, eta, seed) in enumerate([("ddim", 3, 1.0, 4), ("euler-a", 3, 0.0, 5)]):
        img = run(sr, seed, sched, image=low_img, num_inference_steps=steps, eta=eta)
        key = f"superres_{i}"
        out[key] = torch.from_numpy(img)
        cases.append({"key": key, "model": "superres", "scheduler": sched, "steps": steps, "eta": eta, "batch": 1, "seed": seed, "image": "lowres.png"})

    # LDMTextToImagePipeline: LDMBert + BERT WordPiece, UNet2DConditionModel, AutoencoderKL (f=2).
    vocab_dir = FIX / "ldm" / "_bert_vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n")
    tok = BertTokenizer(str(vocab_dir / "vocab.txt"))
    shutil.rmtree(vocab_dir)
    torch.manual_seed(70)
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(tok), max_position_embeddings=77, encoder_layers=2, encoder_ffn_dim=48,
                                      encoder_attention_heads=2, head_dim=8, d_model=32)).eval()
    with torch.no_grad():
        reinit(bert, 70)
    torch.manual_seed(71)
    t_unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()
    with torch.no_grad():
        reinit(t_unet, 71)
    torch.manual_seed(72)
    kl = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    with torch.no_grad():
        reinit(kl, 72)
        kl.decoder.conv_out.weight.mul_(0.5)
    text = save_pipeline(LDMTextToImagePipeline(vqvae=kl, bert=bert, tokenizer=tok, unet=t_unet, scheduler=DDIMScheduler(**LDM_SCHEDULER)), "text2im")
    bert = text.bert
    text_cases = [
        ("A painting of a squirrel eating a burger", "ddim", 4, 6.0, 0.3, 64, 96, 1, 6),
        ("an astronaut riding a horse", "ddim", 3, 1.0, 0.0, 64, 64, 2, 7),
        ("cafe, the cat!", "pndm", 4, 3.0, 0.0, 96, 64, 1, 8),
        ("", "euler", 3, 0.5, 0.0, 64, 64, 1, 9),
    ]
    for i, (prompt, sched, steps, g_scale, eta, h, w, batch, seed) in enumerate(text_cases):
        img = run(text, seed, sched, prompt=[prompt] * batch, height=h, width=w, num_inference_steps=steps, guidance_scale=g_scale, eta=eta)
        key = f"text2im_{i}"
        out[key] = torch.from_numpy(img)
        cases.append({"key": key, "model": "text2im", "prompt": prompt, "scheduler": sched, "steps": steps, "guidance": g_scale, "eta": eta,
                      "height": h, "width": w, "batch": batch, "seed": seed})

    # LDMBert on two prompts, and the tokenizer on many.
    tok = text.tokenizer
    ids = tok(["A painting of a squirrel eating a burger", ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        models["bert_ids"] = ids.float()
        models["bert_hidden"] = bert(ids)[0]
    tokens = [{"prompt": p, "ids": tok(p, padding="max_length", max_length=77, truncation=True).input_ids} for p in BERT_PROMPTS]
    (REF / "bert_tokens.json").write_text(json.dumps(tokens, ensure_ascii=False, indent=0) + "\n")

    save_tensors(REF / "ldm_pipelines.safetensors", out)
    save_tensors(REF / "ldm_models.safetensors", models)
    (REF / "ldm_cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    for k, v in out.items():
        print(f"{k}: {tuple(v.shape)} mean {v.mean():.3f} std {v.std():.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    vqmodel()
    ldm_pipelines()
