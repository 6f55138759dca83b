"""One UNet step in PyTorch (diffusers' UNet2DConditionModel, eager, SDPA attention), timed on
whatever device torch has: the reference `ldm bench unet` is compared against, on the same GPU
(`scripts/device-bench.sh`) or the same CPU (the CPU backend).

    python scripts/torch_unet_step.py --latent 64 --batch 2 --dtype fp16 --runs 10 --json out.json
    python scripts/torch_unet_step.py --model assets/builtin/emoji --device cpu --dtype fp32

Without --model: random weights in SD 1.5's architecture (the same config as ldm's `--model
sd15`). The FLOPs of a step are counted with torch's FlopCounterMode, so both sides' TFLOP/s use
one count.
"""

import argparse
import json
import time

import torch
from diffusers import UNet2DConditionModel

# Stable Diffusion 1.5's unet/config.json keys that differ from diffusers' defaults (as
# src/bench/unet.rs's SD15_UNET_CONFIG).
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            layers_per_block=2, norm_num_groups=32, sample_size=64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=0, help="latent side (default: the UNet's sample_size)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--model", help="a diffusers folder: its unet/ (default: SD 1.5's architecture, random weights)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--json")
    a = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    dtype = torch.float16 if a.dtype == "fp16" else torch.float32
    torch.manual_seed(0)
    if a.model:
        unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
    else:
        unet = UNet2DConditionModel(**SD15)
    unet = unet.to(device=device, dtype=dtype).eval()
    c = unet.config
    latent = a.latent if a.latent else c.sample_size
    sample = torch.randn(a.batch, c.in_channels, latent, latent, device=device, dtype=dtype)
    context = torch.randn(a.batch, 77, c.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)

    def step():
        with torch.no_grad():
            return unet(sample, t, encoder_hidden_states=context).sample

    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    median = times[len(times) // 2]
    out = {"framework": f"torch {torch.__version__} eager, SDPA", "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
           "model": a.model or "sd15 (random weights)", "dtype": a.dtype, "latent": latent, "batch": a.batch, "step_ms_median": median, "steps_ms": times,
           "flops_per_step": flops, "tflops": flops / (median / 1e3) / 1e12}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
