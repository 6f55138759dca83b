//! Prompts to text embeddings, as diffusers' pipelines encode them (`encode_prompt`): one CLIP
//! text encoder for Stable Diffusion 1.x / 2.x, SDXL's two (CLIP ViT-L and OpenCLIP bigG, their
//! penultimate states concatenated, the second's projected end-of-text state pooled). Also the
//! tokens of textual-inversion embeddings and, when asked, AUTOMATIC1111's prompt syntax: weights
//! `(word:1.3)`, `(word)`, `[word]`, escapes, `BREAK`, and prompts longer than one window.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::models::ClipTextModel;
use crate::ops;
use crate::tokenizer::ClipTokenizer;

/// A tokenizer with its text encoder.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
    /// Textual-inversion tokens added to this encoder.
    pub embeddings: Vec<EmbeddingTokens>,
}

/// A textual-inversion token: `token` (and `token_1` ... for more vectors) with consecutive ids.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingTokens {
    pub token: String,
    pub first_id: u32,
    pub vectors: usize,
}

impl TextEncoder {
    /// A tokenizer and model as loaded.
    pub fn new(tokenizer: ClipTokenizer, model: ClipTextModel) -> Self {
        Self { tokenizer, model, embeddings: Vec::new() }
    }
}

/// The text encoders of a model and how its pipeline combines them.
pub enum TextEncoders {
    /// Stable Diffusion 1.x / 2.x: the last layer (or an earlier one, clip skip) after the
    /// final layer norm.
    Single(TextEncoder),
    /// SDXL: CLIP ViT-L (absent in the refiner) and OpenCLIP bigG with projection; their
    /// penultimate layers (no final norm) concatenated, bigG's `text_embeds` pooled.
    Xl { first: Option<TextEncoder>, second: TextEncoder },
}

/// How prompts are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptWeighting {
    /// As diffusers: plain text, cut to the tokenizer's window (77 tokens).
    #[default]
    None,
    /// AUTOMATIC1111's syntax and emphasis, prompts of any length in chunks of 75 tokens.
    A1111,
}

impl std::str::FromStr for PromptWeighting {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Self::None),
            "a1111" | "automatic1111" => Ok(Self::A1111),
            other => Err(Error::Input(format!("prompt weighting {other:?}: use none or a1111"))),
        }
    }
}

/// One prompt's embeddings: `context` `[1, L, D]` (L = 77, or 77 per chunk), and SDXL's pooled
/// `[1, P]`.
pub struct PromptEmbeds {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

/// What the prompt text of a generation is.
pub struct PromptText<'a> {
    pub prompt: &'a str,
    /// SDXL's second encoder's prompt (default: `prompt`).
    pub prompt_2: Option<&'a str>,
    /// Layers skipped at the end (diffusers' count).
    pub clip_skip: usize,
}

impl TextEncoders {
    /// The first tokenizer (for length warnings).
    pub fn tokenizer(&self) -> &ClipTokenizer {
        match self {
            Self::Single(t) => &t.tokenizer,
            Self::Xl { first, second } => &first.as_ref().unwrap_or(second).tokenizer,
        }
    }

    /// The encoders in diffusers' order.
    pub fn encoders(&self) -> Vec<&TextEncoder> {
        match self {
            Self::Single(t) => vec![t],
            Self::Xl { first, second } => first.iter().chain(std::iter::once(second)).collect(),
        }
    }

    /// As [`Self::encoders`], mutably.
    pub fn encoders_mut(&mut self) -> Vec<&mut TextEncoder> {
        match self {
            Self::Single(t) => vec![t],
            Self::Xl { first, second } => first.iter_mut().chain(std::iter::once(second)).collect(),
        }
    }

    /// Whether this is SDXL's pair.
    pub fn is_xl(&self) -> bool {
        matches!(self, Self::Xl { .. })
    }

    /// The fewest layers any encoder has (clip skip must stay below it).
    pub fn min_layers(&self) -> usize {
        self.encoders().iter().map(|e| e.model.num_layers()).min().unwrap_or(0)
    }

    /// diffusers' textual inversion prompt rewrite (`maybe_convert_prompt`): a multi-vector
    /// token `t` becomes `t t_1 ... t_{n-1}`.
    fn convert(prompt: &str, enc: &TextEncoder) -> String {
        let mut out = prompt.to_string();
        for e in enc.embeddings.iter().filter(|e| e.vectors > 1) {
            let expanded: Vec<String> = std::iter::once(e.token.clone()).chain((1..e.vectors).map(|i| format!("{}_{i}", e.token))).collect();
            out = out.replace(&e.token, &expanded.join(" "));
        }
        out
    }

    /// diffusers' `encode_prompt` for one prompt: SD: the last layer (clip skip: an earlier
    /// one) through the final norm; SDXL: each encoder's `hidden_states[-(clip_skip + 2)]`
    /// concatenated, bigG's pooled output. `negative`: diffusers ignores clip skip for the
    /// negative prompt.
    pub async fn encode(&self, gpu: &Gpu, text: &PromptText<'_>, weighting: PromptWeighting, negative: bool) -> Result<PromptEmbeds> {
        let skip = if negative && weighting == PromptWeighting::None { 0 } else { text.clip_skip };
        match self {
            Self::Single(enc) => {
                let layers = enc.model.num_layers().checked_sub(skip).filter(|&l| l > 0).ok_or_else(|| Error::Input(format!("clip skip must be less than {}", enc.model.num_layers())))?;
                let prompt = Self::convert(text.prompt, enc);
                let context = match weighting {
                    PromptWeighting::None => enc.model.encode(gpu, &[enc.tokenizer.encode(&prompt)], layers, true, false)?.hidden,
                    PromptWeighting::A1111 => a1111::encode(gpu, enc, &prompt, layers, true, false).await?.0,
                };
                Ok(PromptEmbeds { context, pooled: None })
            }
            Self::Xl { first, second } => {
                let mut parts = Vec::new();
                let mut pooled = None;
                let p2 = text.prompt_2.unwrap_or(text.prompt);
                for (enc, prompt) in first.iter().map(|e| (e, text.prompt)).chain(std::iter::once((second, p2))) {
                    let layers = enc.model.num_layers().checked_sub(skip + 1).filter(|&l| l > 0).ok_or_else(|| Error::Input(format!("clip skip must be less than {}", enc.model.num_layers() - 1)))?;
                    let want_pool = enc.model.has_projection();
                    let prompt = Self::convert(prompt, enc);
                    let (hidden, pool) = match weighting {
                        PromptWeighting::None => {
                            let e = enc.model.encode(gpu, &[enc.tokenizer.encode(&prompt)], layers, false, want_pool)?;
                            (e.hidden, e.pooled)
                        }
                        PromptWeighting::A1111 => a1111::encode(gpu, enc, &prompt, layers, false, want_pool).await?,
                    };
                    parts.push(hidden);
                    // diffusers keeps the pooled output of the first encoder that has one.
                    if pooled.is_none() {
                        pooled = pool;
                    }
                }
                let lens: Vec<usize> = parts.iter().map(|p| p.dim(1)).collect();
                if lens.windows(2).any(|w| w[0] != w[1]) {
                    return Err(Error::Input(format!("the prompts of the two text encoders make {lens:?} tokens; with prompt weighting keep prompt and prompt 2 to the same number of 75-token chunks")));
                }
                let refs: Vec<&Tensor> = parts.iter().collect();
                let context = if refs.len() == 1 { parts[0].clone() } else { ops::concat(gpu, &refs, 2)? };
                let pooled = pooled.ok_or_else(|| Error::Model("SDXL's second text encoder has no text_projection".into()))?;
                Ok(PromptEmbeds { context, pooled: Some(pooled) })
            }
        }
    }
}

/// AUTOMATIC1111's prompt syntax and emphasis (`modules/prompt_parser.py`,
/// `sd_hijack_clip.py`, emphasis "Original"), reimplemented from its behaviour.
pub mod a1111 {
    use super::TextEncoder;
    use crate::error::Result;
    use crate::gpu::{Gpu, Tensor};
    use crate::ops;

    /// Tokens per chunk between the start and end tokens.
    pub const CHUNK: usize = 75;
    /// A chunk that fills up breaks after its last comma when that is this close to the end.
    const COMMA_BACKTRACK: usize = 20;
    /// `(x)` multiplies by this, `[x]` divides.
    const ROUND: f64 = 1.1;

    /// Python's `re.split(r"\s*\bBREAK\b\s*", text)`.
    fn split_break(text: &str) -> Vec<String> {
        let word = |c: char| c.is_alphanumeric() || c == '_';
        let mut parts = Vec::new();
        let mut start = 0;
        let mut search = 0;
        while let Some(i) = text[search..].find("BREAK").map(|i| search + i) {
            let before = text[..i].chars().next_back();
            let after = text[i + 5..].chars().next();
            if before.is_some_and(word) || after.is_some_and(word) {
                search = i + 5;
                continue;
            }
            let lead = text[start..i].trim_end_matches(char::is_whitespace).len() + start;
            parts.push(text[start..lead].to_string());
            let tail = text[i + 5..].len() - text[i + 5..].trim_start_matches(char::is_whitespace).len();
            start = i + 5 + tail;
            search = start;
        }
        parts.push(text[start..].to_string());
        parts
    }

    /// `parse_prompt_attention`: (text, weight) runs, `("BREAK", -1)` for chunk breaks.
    pub fn parse(text: &str) -> Vec<(String, f64)> {
        let mut res: Vec<(String, f64)> = Vec::new();
        let mut round: Vec<usize> = Vec::new();
        let mut square: Vec<usize> = Vec::new();
        let multiply = |res: &mut Vec<(String, f64)>, from: usize, m: f64| {
            for r in &mut res[from..] {
                r.1 *= m;
            }
        };
        let mut rest = text;
        while !rest.is_empty() {
            // The alternatives of A1111's re_attention, first match wins.
            let (token, weight): (String, Option<String>) = if let Some(esc) = ["\\(", "\\)", "\\[", "\\]", "\\\\"].iter().find(|e| rest.starts_with(**e)) {
                (esc.to_string(), None)
            } else if rest.starts_with('\\') || rest.starts_with('(') || rest.starts_with('[') {
                (rest[..1].to_string(), None)
            } else if let Some(w) = weight_close(rest) {
                w
            } else if rest.starts_with(')') || rest.starts_with(']') || rest.starts_with(':') {
                (rest[..1].to_string(), None)
            } else {
                let n = rest.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(rest.len());
                (rest[..n].to_string(), None)
            };
            rest = &rest[token.len()..];
            let w = weight.as_deref().and_then(|w| w.parse::<f64>().ok());
            if let Some(stripped) = token.strip_prefix('\\') {
                res.push((stripped.to_string(), 1.0));
            } else if token == "(" {
                round.push(res.len());
            } else if token == "[" {
                square.push(res.len());
            } else if let (Some(w), Some(from)) = (w, if weight.is_some() { round.last().copied() } else { None }) {
                round.pop();
                multiply(&mut res, from, w);
            } else if token == ")" && !round.is_empty() {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, ROUND);
            } else if token == "]" && !square.is_empty() {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, 1.0 / ROUND);
            } else {
                for (i, part) in split_break(&token).into_iter().enumerate() {
                    if i > 0 {
                        res.push(("BREAK".into(), -1.0));
                    }
                    res.push((part, 1.0));
                }
            }
        }
        for from in round {
            multiply(&mut res, from, ROUND);
        }
        for from in square {
            multiply(&mut res, from, 1.0 / ROUND);
        }
        if res.is_empty() {
            res.push((String::new(), 1.0));
        }
        let mut i = 0;
        while i + 1 < res.len() {
            if res[i].1 == res[i + 1].1 {
                let next = res.remove(i + 1);
                res[i].0.push_str(&next.0);
            } else {
                i += 1;
            }
        }
        res
    }

    /// `:\s*([+-]?[.\d]+)\s*\)` at the start of `s`: the whole match and the number.
    fn weight_close(s: &str) -> Option<(String, Option<String>)> {
        let b = s.as_bytes();
        if b.first() != Some(&b':') {
            return None;
        }
        let mut i = 1;
        while i < b.len() && (b[i] as char).is_ascii_whitespace() {
            i += 1;
        }
        let num_start = i;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let digits = i;
        while i < b.len() && (b[i] == b'.' || b[i].is_ascii_digit()) {
            i += 1;
        }
        if i == digits {
            return None;
        }
        let num_end = i;
        while i < b.len() && (b[i] as char).is_ascii_whitespace() {
            i += 1;
        }
        if b.get(i) != Some(&b')') {
            return None;
        }
        Some((s[..i + 1].to_string(), Some(s[num_start..num_end].to_string())))
    }

    /// One window of the text encoder: 77 ids and their multipliers.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Chunk {
        pub tokens: Vec<u32>,
        pub multipliers: Vec<f32>,
    }

    /// `tokenize_line`: the prompt's chunks, each `[bos] + 75 tokens (eos-padded) + [eos]`.
    pub fn chunks(enc: &TextEncoder, prompt: &str) -> Vec<Chunk> {
        let tk = &enc.tokenizer;
        let (bos, eos) = (tk.bos_id(), tk.eos_id());
        let comma = tk.token_id(",</w>");
        let mut chunks: Vec<Chunk> = Vec::new();
        let (mut tokens, mut mults): (Vec<u32>, Vec<f64>) = (Vec::new(), Vec::new());
        let mut last_comma: Option<usize> = None;
        let finish = |chunks: &mut Vec<Chunk>, tokens: &mut Vec<u32>, mults: &mut Vec<f64>, last_comma: &mut Option<usize>| {
            tokens.resize(CHUNK, eos);
            mults.resize(CHUNK, 1.0);
            let t: Vec<u32> = std::iter::once(bos).chain(tokens.drain(..)).chain(std::iter::once(eos)).collect();
            let m: Vec<f32> = std::iter::once(1.0).chain(mults.drain(..).map(|v| v as f32)).chain(std::iter::once(1.0)).collect();
            *last_comma = None;
            chunks.push(Chunk { tokens: t, multipliers: m });
        };
        for (text, weight) in parse(prompt) {
            if text == "BREAK" && weight == -1.0 {
                finish(&mut chunks, &mut tokens, &mut mults, &mut last_comma);
                continue;
            }
            let ids = tk.tokens(&text);
            let mut pos = 0;
            while pos < ids.len() {
                let token = ids[pos];
                if Some(token) == comma {
                    last_comma = Some(tokens.len());
                } else if let Some(lc) = last_comma.filter(|&lc| tokens.len() == CHUNK && tokens.len() - lc <= COMMA_BACKTRACK) {
                    // Move what follows the last comma to the next chunk.
                    let (rt, rm) = (tokens.split_off(lc + 1), mults.split_off(lc + 1));
                    finish(&mut chunks, &mut tokens, &mut mults, &mut last_comma);
                    tokens = rt;
                    mults = rm;
                }
                if tokens.len() == CHUNK {
                    finish(&mut chunks, &mut tokens, &mut mults, &mut last_comma);
                }
                // A textual-inversion embedding stays whole in one chunk.
                let group = enc.embeddings.iter().find(|e| e.first_id == token && e.vectors > 1 && ids.len() >= pos + e.vectors && (0..e.vectors).all(|k| ids[pos + k] == e.first_id + k as u32));
                if let Some(n) = group.map(|e| e.vectors) {
                    if tokens.len() + n > CHUNK {
                        finish(&mut chunks, &mut tokens, &mut mults, &mut last_comma);
                    }
                    tokens.extend_from_slice(&ids[pos..pos + n]);
                    mults.extend(std::iter::repeat_n(weight, n));
                    pos += n;
                    continue;
                }
                tokens.push(token);
                mults.push(weight);
                pos += 1;
            }
        }
        if !tokens.is_empty() || chunks.is_empty() {
            finish(&mut chunks, &mut tokens, &mut mults, &mut last_comma);
        }
        // Tokenizers that pad with another token (SD 2.x, SDXL's second) pad after the first end.
        let pad = tk.pad_id();
        if pad != eos {
            for c in &mut chunks {
                if let Some(i) = c.tokens.iter().position(|&t| t == eos) {
                    for t in &mut c.tokens[i + 1..] {
                        *t = pad;
                    }
                }
            }
        }
        chunks
    }

    /// Emphasis "Original": scale each token's state by its multiplier, then restore the
    /// chunk's mean.
    pub fn emphasis(z: &mut [f32], multipliers: &[f32]) {
        let d = z.len() / multipliers.len().max(1);
        let mean = |z: &[f32]| (z.iter().map(|&v| v as f64).sum::<f64>() / z.len().max(1) as f64) as f32;
        let original = mean(z);
        for (row, &m) in z.chunks_mut(d).zip(multipliers) {
            for v in row {
                *v *= m;
            }
        }
        let new = mean(z);
        let k = original / new;
        for v in z.iter_mut() {
            *v *= k;
        }
    }

    /// The prompt's states `[1, 77 x chunks, D]` (the encoder's state after `layers` layers,
    /// through the final norm when `final_norm`), emphasised; with `pooled` the first chunk's
    /// pooled output.
    pub async fn encode(gpu: &Gpu, enc: &TextEncoder, prompt: &str, layers: usize, final_norm: bool, pooled: bool) -> Result<(Tensor, Option<Tensor>)> {
        let chunks = chunks(enc, prompt);
        let mut parts = Vec::new();
        let mut pool = None;
        for (i, c) in chunks.iter().enumerate() {
            let e = enc.model.encode(gpu, std::slice::from_ref(&c.tokens), layers, final_norm, pooled && i == 0)?;
            if i == 0 {
                pool = e.pooled;
            }
            let mut z = gpu.read(&e.hidden).await?;
            emphasis(&mut z, &c.multipliers);
            parts.push(gpu.upload(e.hidden.shape(), e.hidden.dtype(), &z)?);
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        let context = if refs.len() == 1 { parts[0].clone() } else { ops::concat(gpu, &refs, 1)? };
        Ok((context, pool))
    }
}

/// The vectors of a textual-inversion file for each text encoder width: diffusers'
/// `learned_embeds` (one tensor named by its token), AUTOMATIC1111's `.safetensors`
/// (`emb_params`) and `.pt` (`string_to_param.*`, `name`), SDXL's pairs (`clip_l`, `clip_g`).
pub struct Embedding {
    /// The token the file names (diffusers' key, A1111's `name`), if any.
    pub token: Option<String>,
    /// `(vectors, width, values)` per encoder the file is for: one entry, or SDXL's `clip_l`
    /// then `clip_g`.
    pub parts: Vec<(String, usize, Vec<f32>)>,
}

impl Embedding {
    /// Reads `path` of `src` (safetensors, or a PyTorch `.pt` / `.bin` through the safe reader).
    pub async fn read(src: &dyn crate::loader::FileSource, path: &str) -> Result<Self> {
        use crate::loader::{WeightFile, Weights};
        let file = WeightFile::open_any(src, path).await?;
        let names: Vec<String> = file.header.tensors.keys().cloned().collect();
        let w = Weights::new(src, vec![file.clone()]);
        let bad = |why: String| Error::Model(format!("embedding {}: {why}", src.describe(path)));
        let mut parts = Vec::new();
        let token = if names.iter().any(|n| n == "clip_l") && names.iter().any(|n| n == "clip_g") {
            parts.push(vectors(&w, "clip_l", "clip_l").await?);
            parts.push(vectors(&w, "clip_g", "clip_g").await?);
            None
        } else if names.iter().any(|n| n == "emb_params") {
            parts.push(vectors(&w, "emb_params", "emb_params").await?);
            None
        } else if let Some(k) = names.iter().find(|n| n.starts_with("string_to_param.")) {
            parts.push(vectors(&w, k, "string_to_param").await?);
            file.header.metadata.get("name").cloned()
        } else if names.len() == 1 {
            parts.push(vectors(&w, &names[0], "").await?);
            Some(names[0].clone())
        } else {
            return Err(bad(format!("expected one tensor named by its token, emb_params, string_to_param or clip_l + clip_g; it has {:?}", names.iter().take(4).collect::<Vec<_>>())));
        };
        Ok(Self { token, parts })
    }
}

/// A file tensor as (label, width, values) of token vectors.
async fn vectors(w: &crate::loader::Weights<'_>, key: &str, label: &str) -> Result<(String, usize, Vec<f32>)> {
    let (shape, v) = w.read_f32(key).await?;
    let width = *shape.last().unwrap_or(&0);
    if width == 0 || shape.len() > 2 || v.is_empty() {
        return Err(Error::Model(format!("tensor {key} of shape {shape:?} is not a list of token vectors")));
    }
    Ok((label.to_string(), width, v))
}

impl TextEncoders {
    /// Adds a textual-inversion embedding as diffusers' `load_textual_inversion` does: its
    /// vectors become new tokens (`token`, `token_1`, ...) of every encoder whose width they
    /// fit (SDXL pairs: `clip_l` to the first encoder, `clip_g` to the second). Returns the
    /// token.
    pub fn add_embedding(&mut self, gpu: &Gpu, e: &Embedding, token: &str) -> Result<()> {
        if token.trim().is_empty() || token.contains(char::is_whitespace) {
            return Err(Error::Input(format!("the embedding token {token:?} must be one word")));
        }
        let pair = e.parts.len() == 2;
        let mut used = 0;
        for (i, enc) in self.encoders_mut().into_iter().enumerate() {
            let width = enc.model.config.hidden_size;
            let part = if pair {
                // clip_l is for CLIP ViT-L (SDXL's first encoder), clip_g for bigG.
                let want = if enc.model.has_projection() { "clip_g" } else { "clip_l" };
                e.parts.iter().find(|p| p.0 == want)
            } else {
                e.parts.first().filter(|p| p.1 == width)
            };
            let Some((_, w, values)) = part else { continue };
            if *w != width {
                return Err(Error::Model(format!("the embedding for {token} has vectors of {w} values, but text encoder {} takes {width}", i + 1)));
            }
            let n = values.len() / width;
            let tokens: Vec<String> = std::iter::once(token.to_string()).chain((1..n).map(|k| format!("{token}_{k}"))).collect();
            if enc.tokenizer.token_id(token).is_some() {
                return Err(Error::Input(format!("the token {token} is already in the tokenizer; choose another (--embedding FILE:TOKEN)")));
            }
            let first = enc.tokenizer.len_with_added() as u32;
            if first as usize != enc.model.token_rows() {
                return Err(Error::Model(format!("the tokenizer has {first} tokens but the text encoder {} embeddings; cannot add tokens", enc.model.token_rows())));
            }
            let ids = enc.tokenizer.add_tokens(&tokens)?;
            let row = enc.model.add_token_embeddings(gpu, values)?;
            if ids.first() != Some(&row) {
                return Err(Error::Model(format!("token ids {ids:?} and embedding rows from {row} disagree")));
            }
            enc.embeddings.push(EmbeddingTokens { token: token.to_string(), first_id: row, vectors: n });
            used += 1;
        }
        if used == 0 {
            let widths: Vec<usize> = self.encoders().iter().map(|e| e.model.config.hidden_size).collect();
            let got: Vec<usize> = e.parts.iter().map(|p| p.1).collect();
            return Err(Error::Model(format!("the embedding for {token} has vectors of {got:?} values, but this model's text encoders take {widths:?}; is it made for another model family (SD 1.x: 768, SD 2.x: 1024, SDXL: clip_l + clip_g)?")));
        }
        Ok(())
    }
}
