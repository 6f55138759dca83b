#!/usr/bin/env python3
"""diffusers' images of the built-in model, for ldm-web's reference tests (tests/builtin.rs,
tests/cli.rs): StableDiffusionPipeline.from_pretrained(assets/builtin/emoji) in float32 (the
fp16 weights widened), output_type="np". Run with one thread (fixtures.sh does): byte-reproducible.

Writes tests/fixtures/ref/builtin.safetensors (one image batch per case) and builtin_cases.json.
"""

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from common import MODEL_DIR, ROOT, WORK, canonical_caption, random_caption  # noqa: E402

REF = ROOT / "tests" / "fixtures" / "ref"


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    hints = json.loads((MODEL_DIR / "ldm-web.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = hints["steps"], hints["guidance"]
    cases = [
        {"key": "builtin_0", "prompt": hints["example_prompts"][0], "seed": 0, "steps": steps, "guidance": guidance, "batch": 1, "scheduler": None},
        {"key": "builtin_1", "prompt": "a red apple", "seed": 42, "steps": steps, "guidance": guidance, "batch": 1, "scheduler": None},
        {"key": "builtin_2", "prompt": "smiling face with sunglasses, twemoji", "negative_prompt": "noto", "seed": 7, "steps": 12, "guidance": 4.0, "batch": 2, "scheduler": "euler-a"},
    ]
    out = {}
    base = pipe.scheduler
    for c in cases:
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(base.config) if c["scheduler"] == "euler-a" else base
        img = pipe(c["prompt"], negative_prompt=c.get("negative_prompt"), num_inference_steps=c["steps"], guidance_scale=c["guidance"],
                   num_images_per_prompt=c["batch"], generator=torch.Generator().manual_seed(c["seed"]), output_type="np").images
        out[c["key"]] = torch.from_numpy(img).contiguous()
        print(f"{c['key']}: {c['prompt']!r} {tuple(img.shape)} mean {img.mean():.3f}")
    save_file(out, str(REF / "builtin.safetensors"), metadata={"format": "pt"})
    (REF / "builtin_cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    # The fitted tokenizer on captions of every kind and on prompts it was not fitted to.
    import random
    meta = json.loads((WORK / "emoji64.json").read_text()) if (WORK / "emoji64.json").exists() else []
    rng = random.Random(5)
    prompts = [canonical_caption(m) for m in meta[::25]] + [random_caption(m, rng) for m in meta[::40]]
    prompts += hints["example_prompts"] + ["a red apple", "An Astronaut riding a horse on Mars!!", "日本の国旗", "🍎 apple", "", "x" * 200,
                                            "smiling face with sunglasses " * 8, "flag: côte d’ivoire", "1 2 3 keycap #"]
    tokens = [{"prompt": p, "ids": pipe.tokenizer(p, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True).input_ids} for p in prompts]
    (REF / "builtin_tokens.json").write_text(json.dumps(tokens, ensure_ascii=False, indent=0) + "\n")


if __name__ == "__main__":
    main()
