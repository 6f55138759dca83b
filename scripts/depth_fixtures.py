#!/usr/bin/env python3
"""Tiny seeded depth estimators with transformers' outputs, and diffusers' depth-to-image pipeline
running its own estimator (no depth map given).

Models (config + weights + the image processor's preprocessor_config.json, as on the Hub):
  tests/fixtures/depth/dpt-hybrid/       DPTForDepthEstimation, ViT-hybrid (BiT backbone, weight-standardised
                                         convolutions, TF "SAME" padding), readout "project", batch norm in the
                                         fusion residuals: the shape of Intel/dpt-hybrid-midas
  tests/fixtures/depth/dpt/              DPTForDepthEstimation, plain ViT (patch embeddings, position embeddings
                                         resized to another grid): the shape of Intel/dpt-large
  tests/fixtures/depth/depth-anything/   DepthAnythingForDepthEstimation (DINOv2 with layer scale, bicubic
                                         position-embedding interpolation; relative depth): Depth Anything V2
  tests/fixtures/sd2-depth-estimator/    tests/fixtures/sd2-depth plus depth_estimator/ (the dpt-hybrid above)
                                         and feature_extractor/, as stabilityai/stable-diffusion-2-depth
References (tests/fixtures/ref/):
  depth_cases.json, depth.safetensors   per case: the processor's pixel_values, predicted_depth, and the
                                         depth-estimation pipeline's depth image (8-bit, at the input's size)
  depth2img_cases.json, depth2img.safetensors   StableDiffusionDepth2ImgPipeline images without a depth map
  preprocessed_controls.json, .safetensors      StableDiffusionControlNetPipeline images whose condition is
                                         cv2.Canny's edges or the depth-estimation pipeline's depth of a photo,
                                         made as diffusers' ControlNet examples make them

Run through scripts/fixtures.sh after cond_fixtures.py (reads tests/fixtures/sd2-depth). One thread:
re-running reproduces byte-identical files.
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DIFFUSERS_VERBOSITY"] = "error"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    BitConfig, DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTConfig,
    DPTForDepthEstimation, DPTImageProcessor, pipeline,
)
import cv2  # noqa: E402
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionDepth2ImgPipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import reinit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "depth"
REF = FIX / "ref"
IMAGES = FIX / "images"

torch.use_deterministic_algorithms(True)


def prepare(model, seed):
    """Seeded weights that keep activations O(1); batch-norm statistics away from (0, 1); a head
    whose ReLU output is positive and varied (random weights would zero most of it)."""
    with torch.no_grad():
        reinit(model, seed)
        g = torch.Generator().manual_seed(seed + 1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
        last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.bias.fill_(1.0)
    return model.eval()


def dpt_hybrid():
    bit = BitConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="bottleneck",
        global_padding="same", num_groups=4, out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True,
    )
    cfg = DPTConfig(
        is_hybrid=True, backbone_config=bit, backbone_featmap_shape=[1, 64, 4, 4], hidden_size=32, num_hidden_layers=4,
        num_attention_heads=2, intermediate_size=48, image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
        readout_type="project", reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=[16, 32, 24, 32], fusion_hidden_size=16,
        use_batch_norm_in_fusion_residual=True, layer_norm_eps=1e-12,
    )
    proc = DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False, ensure_multiple_of=1, resample=3,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return prepare(DPTForDepthEstimation(cfg), 300), proc


def dpt_vit():
    cfg = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1, 2, 3], readout_type="project", reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16,
    )
    # transformers reshapes a plain ViT's tokens to a square grid: its processor must make squares
    # (40x40 here, so the 4x4 position embeddings are resized to 5x5).
    proc = DPTImageProcessor(size={"height": 40, "width": 40}, keep_aspect_ratio=False, ensure_multiple_of=1, resample=3,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return prepare(DPTForDepthEstimation(cfg), 310), proc


def depth_anything():
    dino = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=28,
        out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False, apply_layernorm=True,
        layerscale_value=1.0,
    )
    cfg = DepthAnythingConfig(
        backbone_config=dino, reassemble_hidden_size=32, patch_size=14, reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type="relative",
    )
    proc = DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_pad=False)
    model = DepthAnythingForDepthEstimation(cfg)
    prepare(model, 320)
    with torch.no_grad():
        # DINOv2's layer-scale parameters start at layerscale_value: make them differ per channel.
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(0.5 + torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model.eval(), proc


def save_model(name, model, proc):
    folder = OUT / name
    model.save_pretrained(str(folder), safe_serialization=True)
    proc.save_pretrained(str(folder))
    return folder


def gray_image():
    img = Image.open(IMAGES / "init.png").convert("L")
    return img.resize((45, 37), Image.Resampling.BILINEAR)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    models = {"dpt-hybrid": dpt_hybrid(), "dpt": dpt_vit(), "depth-anything": depth_anything()}
    inputs = {"init.png": Image.open(IMAGES / "init.png").convert("RGB"), "init_big.png": Image.open(IMAGES / "init_big.png").convert("RGB"),
              "init_rgba.png": Image.open(IMAGES / "init_rgba.png").convert("RGB"), "gray": gray_image().convert("RGB")}
    gray_image().save(OUT / "gray.png")
    out, cases = {}, []
    for name, (model, proc) in models.items():
        folder = save_model(name, model, proc)
        # What a user's code loads back (the saved files), the PIL image processor.
        proc = DPTImageProcessor.from_pretrained(str(folder))
        estimator = pipeline("depth-estimation", model=model, image_processor=proc, device="cpu")
        for image_name, img in inputs.items():
            key = f"{name}/{image_name}"
            pixel_values = proc(images=img, return_tensors="pt").pixel_values
            with torch.no_grad():
                depth = model(pixel_values).predicted_depth
            # transformers' depth-estimation pipeline: bicubic to the input size, then 255 * d / max.
            image = np.array(estimator(img)["depth"], dtype=np.float32)
            out[f"{key}.pixel_values"] = pixel_values[0]
            out[f"{key}.predicted_depth"] = depth[0]
            out[f"{key}.depth_image"] = torch.from_numpy(image)
            cases.append({"key": key, "model": name, "image": image_name, "pixel_values": list(pixel_values.shape), "depth": list(depth.shape)})
            print(f"{key}: input {tuple(pixel_values.shape)} depth {tuple(depth.shape)} range {depth.min().item():.3f}..{depth.max().item():.3f} std {depth.std().item():.3f}")
    save_file({k: v.float().contiguous() for k, v in out.items()}, str(REF / "depth.safetensors"), metadata={"format": "pt"})
    (REF / "depth_cases.json").write_text(json.dumps(cases, indent=1) + "\n")

    # Depth-to-image with its own estimator: sd2-depth plus depth_estimator/ and feature_extractor/.
    target = FIX / "sd2-depth-estimator"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(FIX / "sd2-depth", target)
    hybrid, hybrid_proc = models["dpt-hybrid"]
    hybrid.save_pretrained(str(target / "depth_estimator"), safe_serialization=True)
    hybrid_proc.save_pretrained(str(target / "feature_extractor"))
    index = json.loads((target / "model_index.json").read_text())
    index["depth_estimator"] = ["transformers", "DPTForDepthEstimation"]
    index["feature_extractor"] = ["transformers", "DPTImageProcessor"]
    (target / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(str(target))
    pipe.set_progress_bar_config(disable=True)
    d2i, d2i_cases = {}, []
    for k, (image_name, prompt, steps, strength, seed) in enumerate([("init.png", "a cat", 4, 0.8, 3), ("init_big.png", "a dog on a sofa", 3, 1.0, 9)]):
        img = Image.open(IMAGES / image_name).convert("RGB")
        images = pipe(prompt, image=img, num_inference_steps=steps, strength=strength, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images
        key = f"depth2img_{k}"
        d2i[key] = torch.from_numpy(images)
        d2i_cases.append({"key": key, "image": image_name, "prompt": prompt, "steps": steps, "strength": strength, "seed": seed})
        print(f"{key}: {image_name} -> {images.shape}, mean {images.mean():.4f}")
    save_file({k: v.float().contiguous() for k, v in d2i.items()}, str(REF / "depth2img.safetensors"), metadata={"format": "pt"})
    (REF / "depth2img_cases.json").write_text(json.dumps(d2i_cases, indent=1) + "\n")

    # ControlNets fed by the preprocessors, the conditions made as diffusers' examples make them.
    net = ControlNetModel.from_pretrained(str(FIX / "controlnet-a")).eval()
    cpipe = StableDiffusionControlNetPipeline.from_pretrained(str(FIX / "sd1"), controlnet=net, safety_checker=None, feature_extractor=None)
    cpipe.set_progress_bar_config(disable=True)
    da_model, da_proc = models["depth-anything"]
    estimator = pipeline("depth-estimation", model=da_model, image_processor=DPTImageProcessor.from_pretrained(str(OUT / "depth-anything")), device="cpu")
    photo = Image.open(IMAGES / "init_big.png").convert("RGB")
    edges = cv2.Canny(np.array(photo), 100, 200)[:, :, None]
    depth = np.array(estimator(photo)["depth"])[:, :, None]
    pc, pc_cases = {}, []
    for k, (kind, cond) in enumerate([("canny", edges), ("depth", depth)]):
        cond_img = Image.fromarray(np.concatenate([cond] * 3, axis=2))
        images = cpipe("a cat", image=cond_img, num_inference_steps=3, guidance_scale=7.5, height=64, width=96,
                       generator=torch.Generator().manual_seed(5 + k), output_type="np").images
        key = f"control_{kind}"
        pc[key] = torch.from_numpy(images)
        pc_cases.append({"key": key, "preprocess": kind, "photo": "init_big.png", "prompt": "a cat", "steps": 3, "guidance": 7.5,
                         "width": 96, "height": 64, "seed": 5 + k, "depth_model": "depth-anything"})
        print(f"{key}: {images.shape}, mean {images.mean():.4f}")
    save_file({k: v.float().contiguous() for k, v in pc.items()}, str(REF / "preprocessed_controls.safetensors"), metadata={"format": "pt"})
    (REF / "preprocessed_controls.json").write_text(json.dumps(pc_cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
