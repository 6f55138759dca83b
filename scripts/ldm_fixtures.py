#!/usr/bin/env python3
"""Tiny random-weight fixtures of the latent diffusion paper's own model family (CompVis LDMs), with
diffusers' reference outputs. Run through scripts/fixtures.sh (one thread: byte-reproducible).

Outputs (see tests/fixtures/README.md):
  tests/fixtures/ldm/vqvae/            a diffusers VQModel folder (two blocks: f=2, 3 latent channels)
  tests/fixtures/ref/vqmodel.safetensors  latents and VQModel.decode outputs, quantised and not
"""

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DIFFUSERS_VERBOSITY"] = "error"

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from diffusers import VQModel  # noqa: E402

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


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    vqmodel()
