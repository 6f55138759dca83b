"""Shared by the built-in model's training scripts: data, captions, the fitted CLIP tokenizer,
checkpoints. See README.md in this folder for the whole recipe."""

import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import regex
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODEL_DIR = ROOT / "assets" / "builtin" / "emoji"
WORK = Path(os.environ.get("LDM_BUILTIN_WORK", "/work/builtin-train"))

STYLES = ("noto", "twemoji")
CATEGORIES = ("Smileys & Emotion", "People & Body", "Component", "Animals & Nature", "Food & Drink",
              "Travel & Places", "Activities", "Objects", "Symbols", "Flags")


def threads():
    n = int(os.environ.get("LDM_TRAIN_THREADS", "2"))
    torch.set_num_threads(n)
    return n


def load_data():
    """(images uint8 [N, 64, 64, 3], metadata list) as written by data.py."""
    images = np.load(WORK / "emoji64.npz")["images"]
    meta = json.loads((WORK / "emoji64.json").read_text())
    return images, meta


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] to float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def canonical_caption(m: dict) -> str:
    """The caption the evaluation and the model card use: label and style."""
    return f"{m['label']}, {m['style']}"


def random_caption(m: dict, rng: random.Random) -> str:
    """A training caption: the label (sometimes a short name, sometimes with an article), and at
    random some tags, the category and the style word."""
    name = m["label"]
    if m["short_names"] and rng.random() < 0.15:
        name = m["short_names"][0].replace("_", " ").replace("-", " ")
    if rng.random() < 0.25 and not name.startswith("flag"):
        name = f"{article(name)} {name}"
    parts = [name]
    tags = [t for t in m["tags"] if t not in name.split()]
    if tags and rng.random() < 0.3:
        parts.append(", ".join(rng.sample(tags, min(len(tags), rng.randint(1, 3)))))
    if rng.random() < 0.2:
        parts.append(m["category"].lower())
    if rng.random() < 0.7:
        parts.append(m["style"])
    return ", ".join(parts)


# ---- CLIP-format BPE fitted to the captions ---------------------------------------------------
# CLIP's pre-tokeniser (lower-cased, whitespace-collapsed text) and GPT-2's byte alphabet: the
# fitted vocabulary loads in transformers' CLIPTokenizer and in ldm-web's tokenizer unchanged.
PRETOKENIZE = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def words_of(text: str):
    byte_map = bytes_to_unicode()
    for piece in PRETOKENIZE.findall(" ".join(text.lower().split())):
        yield "".join(byte_map[b] for b in piece.encode("utf-8"))


def caption_corpus(meta):
    """Every word a caption can contain, with a weight: labels, short names, tags, categories,
    styles, articles."""
    counts = Counter()
    for m in meta:
        texts = [canonical_caption(m), ", ".join(m["tags"]), m["category"], *(s.replace("_", " ") for s in m["short_names"])]
        texts.append(f"{article(m['label'])} {m['label']}")
        for t in texts:
            counts.update(words_of(t))
    return counts


def fit_bpe(counts: Counter, max_vocab: int):
    """Greedy BPE on word counts (words end in `</w>`, as CLIP's): the most frequent pair first,
    ties by the pair itself, until every word is one token or the vocabulary is full. Returns
    (vocab dict token -> id, merges list)."""
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in counts.items()}
    merges = []
    budget = max_vocab - len(vocab) - 2
    while len(merges) < budget:
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        new_words = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    vocab += [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def write_tokenizer(folder: Path, vocab: dict, merges, max_length: int):
    """vocab.json, merges.txt and the configs as diffusers' SD 1.x tokenizer folders have them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": True, "errors": "replace", "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))


# ---- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: Path, **state):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path):
    # weights_only: tensors and plain values only, so no code can run from the file.
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
