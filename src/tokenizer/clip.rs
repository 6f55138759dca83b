//! The CLIP tokenizer, giving exactly the ids of transformers' `CLIPTokenizer` as diffusers'
//! Stable Diffusion pipelines call it:
//! `tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids`.
//!
//! # Why hand-written rather than the `tokenizers` crate
//!
//! `tokenizers` 0.22.2 (the newest release) does build for `wasm32-unknown-unknown` with
//! `default-features = false, features = ["unstable_wasm"]` (fancy-regex in place of
//! Oniguruma). But a probe cdylib that parses a `tokenizer.json` and encodes one prompt
//! (`opt-level = "s"`, fat LTO, one codegen unit, `panic = "abort"`, like the `wasm-release`
//! profile) weighs 2,251,717 bytes with it against 38,656 bytes for serde_json alone: +2.2 MB,
//! far over the 600 KB budget. The same probe with this module weighs 342,005 bytes (+303 KB,
//! mostly Unicode tables). Checked against transformers 5.24.0 / tokenizers
//! 0.23.3: about 9,000 prompts (CLIP-like, random merges, random code points, special-token
//! texts, whitespace and case variants; about 19,000 encodings) in SD1, SD2 and other
//! configurations, and `tests/fixtures/ref/tokens.json`.
//!
//! Unicode tables are chosen to be the ones `tokenizers` uses, so that even rare characters
//! agree: NFC from `unicode-normalization-alignments` 0.1.12 (the crate `tokenizers` itself uses;
//! Unicode 9, so e.g. the Dives Akuru pair U+11935 U+11930 is not composed, as in transformers),
//! letters and numbers from `unicode-properties` pinned to 0.1.3 (Unicode 16.0, the version of
//! the Oniguruma tables behind the pre-tokeniser's `\p{L}` / `\p{N}`; 0.1.4+ has Unicode 17+
//! and would call some 17,000 newer code points letters), whitespace and lower case from Rust's
//! standard library (as in `tokenizers`). All 1,112,064 code points were checked one by one
//! against `tokenizers` for class and normalisation.
//!
//! # What transformers 5 does, and this module reproduces
//!
//! `CLIPTokenizer` is backed by the `tokenizers` library, whatever files it is loaded from (a
//! `tokenizer.json` only contributes its vocabulary, merges and added tokens; the pipeline below
//! is always CLIP's own):
//! 1. added tokens are cut out of the text first: those with `normalized: false` from the raw
//!    text, then, after normalising the pieces in between, those with `normalized: true` from the
//!    normalised text (leftmost-longest matching, with the `single_word`, `lstrip` and `rstrip`
//!    flags). The special tokens of `tokenizer_config.json` are added tokens: so with SD2's
//!    `pad_token: "!"`, every `!` of a prompt becomes the token `!` (id 0) instead of going
//!    through BPE, exactly as in diffusers;
//! 2. normalisation: NFC, every run of Unicode whitespace becomes one space, then each character
//!    is lower-cased on its own (`char::to_lowercase`, so `Σ` is always `σ`);
//! 3. pre-tokenisation: the matches of `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|`
//!    `[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+` are kept and the rest (spaces) dropped; the byte-level
//!    GPT-2 split that follows only cuts the first two alternatives' matches, into `<|`, the word
//!    and `|>` (so they only act as piece boundaries: `<|endoftext|>-` gives `|>` and `-`);
//! 4. each piece's UTF-8 bytes are mapped to GPT-2's printable byte alphabet, `</w>` is appended
//!    to its last character, and BPE merges by rank (lowest first, leftmost on ties; characters
//!    missing from the vocabulary become the unknown token, each on its own);
//! 5. `<|startoftext|>` + ids + `<|endoftext|>`, the ids cut to `model_max_length - 2`, then
//!    padded with the pad token up to `model_max_length`.
//!
//! # Checkpoints without tokenizer files
//!
//! Single-file checkpoints carry no tokenizer. SD 1.x and 2.x both use OpenAI CLIP's vocabulary,
//! which [`ClipTokenizer::from_clip_bpe`] builds from CLIP's BPE file (kept, gzipped, as
//! `assets/clip/bpe_simple_vocab_16e6.txt.gz`; the library does not embed it), with the padding
//! of [`ClipPad`] and the configuration of the diffusers repositories.

use std::collections::{BinaryHeap, HashMap};

use serde::{Deserialize, Serialize};
use unicode_normalization_alignments::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

use crate::{Error, Result};

/// A token as `tokenizer_config.json` writes it: a plain string, or an `AddedToken` object
/// (`{"__type": "AddedToken", "content": ..., "normalized": ..., ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum TokenSpec {
    /// A plain string: a special token matched in the raw text.
    Text(String),
    /// An `AddedToken` object with its matching flags.
    Added(AddedTokenSpec),
}

impl TokenSpec {
    /// The token's text.
    pub fn content(&self) -> &str {
        match self {
            TokenSpec::Text(s) => s,
            TokenSpec::Added(a) => &a.content,
        }
    }
}

impl From<&str> for TokenSpec {
    fn from(s: &str) -> Self {
        TokenSpec::Text(s.to_string())
    }
}

/// An `AddedToken` object (in `tokenizer_config.json` and `tokenizer.json`'s `added_tokens`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AddedTokenSpec {
    pub content: String,
    #[serde(default)]
    pub single_word: bool,
    #[serde(default)]
    pub lstrip: bool,
    #[serde(default)]
    pub rstrip: bool,
    /// Matched in the normalised (lower-cased) text rather than the raw text.
    #[serde(default)]
    pub normalized: Option<bool>,
    #[serde(default)]
    pub special: Option<bool>,
}

/// The keys of a Hugging Face `tokenizer_config.json` that matter to CLIP. Unknown keys are
/// ignored; missing ones take `CLIPTokenizer`'s defaults; a token set to `null` is absent.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct TokenizerConfig {
    /// Padded and truncated length (77 for every CLIP text encoder). Must be 2 to 65536; the
    /// "unset" value transformers writes (1e30) is rejected.
    #[serde(deserialize_with = "de_max_length")]
    pub model_max_length: usize,
    pub bos_token: Option<TokenSpec>,
    pub eos_token: Option<TokenSpec>,
    pub unk_token: Option<TokenSpec>,
    pub pad_token: Option<TokenSpec>,
    pub sep_token: Option<TokenSpec>,
    pub cls_token: Option<TokenSpec>,
    pub mask_token: Option<TokenSpec>,
    /// transformers 4's name for extra special tokens.
    pub additional_special_tokens: Option<Vec<TokenSpec>>,
    /// transformers 5's name: a list, or an object of named tokens.
    pub extra_special_tokens: Option<serde_json::Value>,
    /// Added tokens by id, as transformers 4.34+ saves them; when present they take precedence
    /// over the same texts among the special tokens.
    pub added_tokens_decoder: Option<HashMap<String, AddedTokenSpec>>,
    /// Kept for completeness: transformers 5's `CLIPTokenizer` lower-cases whatever it says.
    pub do_lower_case: Option<bool>,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            model_max_length: 77,
            bos_token: Some("<|startoftext|>".into()),
            eos_token: Some("<|endoftext|>".into()),
            unk_token: Some("<|endoftext|>".into()),
            pad_token: Some("<|endoftext|>".into()),
            sep_token: None,
            cls_token: None,
            mask_token: None,
            additional_special_tokens: None,
            extra_special_tokens: None,
            added_tokens_decoder: None,
            do_lower_case: None,
        }
    }
}

/// The longest sequence accepted as `model_max_length` (CLIP uses 77).
const MAX_MODEL_LENGTH: usize = 1 << 16;

impl TokenizerConfig {
    /// Parses the text of a `tokenizer_config.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let config: TokenizerConfig = serde_json::from_str(json)
            .map_err(|e| Error::Model(format!("tokenizer_config.json: {e}")))?;
        config.max_length()?;
        Ok(config)
    }

    /// The configured `model_max_length`, checked.
    fn max_length(&self) -> Result<usize> {
        let m = self.model_max_length;
        if !(2..=MAX_MODEL_LENGTH).contains(&m) {
            return Err(Error::Model(format!(
                "tokenizer_config.json: model_max_length {m} is not from 2 to {MAX_MODEL_LENGTH} \
                 (CLIP text encoders use 77)"
            )));
        }
        Ok(m)
    }
}

/// `model_max_length` as any JSON number: a whole one in range, else an error naming it.
fn de_max_length<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    n.as_u64()
        .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= 1e15).map(|f| f as u64))
        .and_then(|v| usize::try_from(v).ok())
        .filter(|v| (2..=MAX_MODEL_LENGTH).contains(v))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "model_max_length {n} is not a whole number from 2 to {MAX_MODEL_LENGTH} (CLIP text encoders use 77)"
            ))
        })
}

/// The padding of a built-in CLIP tokenizer ([`ClipTokenizer::from_clip_bpe`]): the one way the
/// tokenizers of Stable Diffusion 1.x and 2.x differ, as both use OpenAI CLIP's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClipPad {
    /// SD 1.x (OpenAI CLIP ViT-L/14): pads with `<|endoftext|>` (id 49407).
    EndOfText,
    /// SD 2.x (OpenCLIP ViT-H/14): `pad_token` is `!` (id 0). Being a special token, it also
    /// makes every `!` of a prompt the token `!` (0) instead of BPE's `!</w>` (256) and such.
    Exclamation,
}

impl ClipPad {
    /// The `tokenizer/tokenizer_config.json` of the diffusers repositories of SD 1.x
    /// (`stable-diffusion-v1-5/stable-diffusion-v1-5`) or 2.x (`stabilityai/stable-diffusion-2-1`,
    /// `-2-1-base`): `model_max_length` 77, `bos_token`, `eos_token` and `unk_token` as
    /// `AddedToken`s with `normalized: true`, and `pad_token` the plain string `<|endoftext|>` or
    /// `!`. The flags matter when a prompt contains the special tokens' texts: with SD 1.x the
    /// later plain `pad_token` makes `<|endoftext|>` match only as written, while
    /// `<|startoftext|>` also matches in other cases (`<|StartOfText|>`); with SD 2.x both match
    /// in any case.
    pub fn tokenizer_config(self) -> TokenizerConfig {
        let added = |content: &str| {
            Some(TokenSpec::Added(AddedTokenSpec {
                content: content.to_string(),
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: Some(true),
                special: None,
            }))
        };
        TokenizerConfig {
            model_max_length: 77,
            bos_token: added(CLIP_START),
            eos_token: added(CLIP_END),
            unk_token: added(CLIP_END),
            pad_token: Some(match self {
                ClipPad::EndOfText => CLIP_END.into(),
                ClipPad::Exclamation => "!".into(),
            }),
            do_lower_case: Some(true),
            ..TokenizerConfig::default()
        }
    }
}

/// OpenAI CLIP's tokens (by id) and merges (by rank) from the text of its BPE file, as
/// [`ClipTokenizer::from_clip_bpe`] describes.
fn clip_bpe_vocabulary(bpe_text: &str) -> Result<(Vec<String>, Vec<(String, String)>)> {
    let bad = |what: String| {
        Error::Model(format!(
            "CLIP BPE file: {what}; expected the text of OpenAI CLIP's bpe_simple_vocab_16e6.txt \
             (gunzipped)"
        ))
    };
    let mut merges = Vec::with_capacity(CLIP_MERGES);
    for (n, line) in bpe_text.split('\n').enumerate().skip(1).take(CLIP_MERGES) {
        // Python's `str.split()`, as simple_tokenizer.py splits a merge line.
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => return Err(bad(format!("line {} is not two tokens: {line:?}", n + 1))),
        }
    }
    if merges.len() < CLIP_MERGES {
        return Err(bad(format!("{} merge lines, CLIP uses {CLIP_MERGES}", merges.len())));
    }
    // `bytes_to_unicode`'s order is the characters' code point order.
    let mut alphabet = byte_alphabet();
    alphabet.sort_unstable();
    let mut tokens: Vec<String> = Vec::with_capacity(2 * 256 + CLIP_MERGES + 2);
    tokens.extend(alphabet.iter().map(|c| c.to_string()));
    tokens.extend(alphabet.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.extend([CLIP_START.to_string(), CLIP_END.to_string()]);
    let distinct: std::collections::HashSet<&String> = tokens.iter().collect();
    if distinct.len() != tokens.len() {
        return Err(bad(format!("{} of its {} tokens are repeats", tokens.len() - distinct.len(), tokens.len())));
    }
    Ok((tokens, merges))
}

/// The `tokenizer/` folder of a diffusers model for OpenAI CLIP's vocabulary (`vocab.json`,
/// `merges.txt`, `tokenizer_config.json`, as (file name, text)), which
/// [`ClipTokenizer::from_files`] reads back as [`ClipTokenizer::from_clip_bpe`]'s tokenizer:
/// `ldm convert` writes it for single-file checkpoints.
pub fn clip_bpe_files(bpe_text: &str, pad: ClipPad) -> Result<Vec<(&'static str, String)>> {
    let (tokens, merges) = clip_bpe_vocabulary(bpe_text)?;
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.into_iter().enumerate().map(|(id, t)| (t, id.into())).collect();
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(&format!("{a} {b}\n"));
    }
    let mut config = serde_json::to_value(pad.tokenizer_config())
        .map_err(|e| Error::Model(format!("tokenizer_config.json: {e}")))?;
    config["tokenizer_class"] = "CLIPTokenizer".into();
    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    Ok(vec![
        ("vocab.json", json(&serde_json::Value::Object(vocab))),
        ("merges.txt", merges_txt),
        ("tokenizer_config.json", json(&config)),
    ])
}

const CLIP_START: &str = "<|startoftext|>";
const CLIP_END: &str = "<|endoftext|>";
/// The merges of OpenAI CLIP's vocabulary: `49152 - 256 - 2`, the first ones of its BPE file.
const CLIP_MERGES: usize = 49152 - 256 - 2;

/// An added token as the tokenizer matches it.
#[derive(Debug, Clone)]
pub(super) struct AddedToken {
    pub(super) content: String,
    pub(super) id: u32,
    pub(super) single_word: bool,
    pub(super) lstrip: bool,
    pub(super) rstrip: bool,
    pub(super) normalized: bool,
}

/// The CLIP BPE tokenizer of a Stable Diffusion checkpoint.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Added tokens matched in the raw text, then those matched in the normalised text (with
    /// their contents normalised).
    raw_added: Vec<AddedToken>,
    normalized_added: Vec<AddedToken>,
    /// The byte-level character of each byte, as a string.
    byte_chars: Vec<String>,
    unk_id: Option<u32>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

/// `tokenizer.json`, as far as CLIP needs it.
#[derive(Deserialize)]
struct TokenizerJson {
    model: TokenizerJsonModel,
    #[serde(default)]
    added_tokens: Vec<AddedTokenSpec>,
}

#[derive(Deserialize)]
struct TokenizerJsonModel {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    #[serde(default)]
    merges: Vec<MergeEntry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MergeEntry {
    Text(String),
    Pair(Vec<String>),
}

impl ClipTokenizer {
    /// Builds the tokenizer from the texts of `vocab.json` and `merges.txt` (the files of an SD
    /// checkpoint's `tokenizer/` folder) and its parsed `tokenizer_config.json`. When the folder
    /// also has a `tokenizer.json`, transformers reads that one (its `added_tokens` can carry
    /// other matching flags): use [`from_tokenizer_json`](Self::from_tokenizer_json) then.
    pub fn from_files(vocab_json: &str, merges_txt: &str, config: TokenizerConfig) -> Result<Self> {
        let vocab: HashMap<String, u32> = serde_json::from_str(vocab_json)
            .map_err(|e| Error::Model(format!("vocab.json: {e}")))?;
        let mut merges = Vec::new();
        // As `tokenizers` reads merges.txt: line by line, skipping `#version` lines; every other
        // line must be two tokens separated by one space.
        let mut lines: Vec<&str> = merges_txt.split('\n').collect();
        if lines.last() == Some(&"") {
            lines.pop();
        }
        for (n, line) in lines.into_iter().enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.starts_with("#version") {
                continue;
            }
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() != 2 {
                return Err(Error::Model(format!(
                    "merges.txt line {}: expected two tokens separated by one space, found {line:?}",
                    n + 1
                )));
            }
            merges.push((parts[0].to_string(), parts[1].to_string()));
        }
        Self::build(vocab, merges, Vec::new(), config)
    }

    /// Builds the tokenizer from the text of a Hugging Face `tokenizer.json` (its `model.vocab`,
    /// `model.merges` and `added_tokens`) and the parsed `tokenizer_config.json`. Like
    /// transformers, the file's own normaliser and pre-tokeniser settings are not used: CLIP's are.
    pub fn from_tokenizer_json(json: &str, config: TokenizerConfig) -> Result<Self> {
        let file: TokenizerJson = serde_json::from_str(json)
            .map_err(|e| Error::Model(format!("tokenizer.json: {e}")))?;
        if let Some(kind) = &file.model.kind {
            if kind != "BPE" {
                return Err(Error::Model(format!(
                    "tokenizer.json: the model is {kind}, a CLIP tokenizer needs BPE"
                )));
            }
        }
        let mut merges = Vec::with_capacity(file.model.merges.len());
        for (n, m) in file.model.merges.into_iter().enumerate() {
            let parts: Vec<String> = match m {
                MergeEntry::Text(s) => s.split(' ').map(str::to_string).collect(),
                MergeEntry::Pair(p) => p,
            };
            let [a, b]: [String; 2] = parts.try_into().map_err(|p: Vec<String>| {
                Error::Model(format!("tokenizer.json: merge {n} is not a pair of tokens: {p:?}"))
            })?;
            merges.push((a, b));
        }
        Self::build(file.model.vocab, merges, file.added_tokens, config)
    }

    /// Builds OpenAI CLIP's tokenizer, the one of SD 1.x and 2.x, from the text of CLIP's BPE
    /// file `bpe_simple_vocab_16e6.txt` (decompressed; the repository keeps it, gzipped, as
    /// `assets/clip/bpe_simple_vocab_16e6.txt.gz`), for checkpoints that carry no tokenizer.
    ///
    /// The vocabulary is built as OpenAI's `simple_tokenizer.py` builds it, which is also
    /// `openai/clip-vit-large-patch14`'s `vocab.json` and `merges.txt`: the merges are lines 1 to
    /// 48,894 of the file (line 0 is a version line; later lines are unused); the tokens are
    /// GPT-2's 256 byte characters (in `bytes_to_unicode` order), the same with `</w>`, each
    /// merge's two parts joined, then `<|startoftext|>` and `<|endoftext|>`: 49,408 ids. The
    /// configuration is [`ClipPad::tokenizer_config`]'s. Takes well under 0.1 s natively
    /// (release build).
    pub fn from_clip_bpe(bpe_text: &str, pad: ClipPad) -> Result<Self> {
        let (tokens, merges) = clip_bpe_vocabulary(bpe_text)?;
        let vocab: HashMap<String, u32> =
            tokens.into_iter().enumerate().map(|(id, t)| (t, id as u32)).collect();
        Self::build(vocab, merges, Vec::new(), pad.tokenizer_config())
    }

    fn build(
        vocab: HashMap<String, u32>,
        merge_list: Vec<(String, String)>,
        json_added: Vec<AddedTokenSpec>,
        config: TokenizerConfig,
    ) -> Result<Self> {
        let max_length = config.max_length()?;
        if vocab.is_empty() {
            return Err(Error::Model("the tokenizer vocabulary is empty".into()));
        }
        let mut merges = HashMap::with_capacity(merge_list.len());
        for (rank, (a, b)) in merge_list.iter().enumerate() {
            let id = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| {
                    Error::Model(format!("merge {rank} ({a} {b}): {t:?} is not in the vocabulary"))
                })
            };
            let merged = format!("{a}{b}");
            // Later duplicates overwrite earlier ones, as in `tokenizers`.
            merges.insert((id(a)?, id(b)?), (rank as u32, id(&merged)?));
        }

        // The added tokens, in the order transformers adds them: the `added_tokens_decoder` of the
        // config (else the `added_tokens` of tokenizer.json) by id, then the named special tokens
        // whose texts are not among those, then the extra special tokens. When a text comes
        // twice, the later one's flags win; ids come from the vocabulary, else follow it.
        let mut specs: Vec<AddedTokenSpec> = Vec::new();
        let decoder: Vec<AddedTokenSpec> = match &config.added_tokens_decoder {
            Some(map) => {
                let mut entries = Vec::with_capacity(map.len());
                for (id, spec) in map {
                    let id: u64 = id.parse().map_err(|_| {
                        Error::Model(format!("tokenizer_config.json: added token id {id:?} is not a number"))
                    })?;
                    entries.push((id, spec.clone()));
                }
                entries.sort_by_key(|(id, _)| *id);
                entries.into_iter().map(|(_, s)| s).collect()
            }
            None => json_added,
        };
        for mut spec in decoder {
            // transformers builds these with `AddedToken(**entry)`: not special unless it says so,
            // and normalised unless special.
            let special = spec.special.unwrap_or(false);
            spec.normalized = Some(spec.normalized.unwrap_or(!special));
            specs.push(spec);
        }
        let decoder_contents: Vec<String> = specs.iter().map(|s| s.content.clone()).collect();
        let mut named: Vec<TokenSpec> = [
            &config.bos_token,
            &config.eos_token,
            &config.unk_token,
            &config.sep_token,
            &config.pad_token,
            &config.cls_token,
            &config.mask_token,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        if let Some(extra) = &config.additional_special_tokens {
            named.extend(extra.iter().cloned());
        }
        match &config.extra_special_tokens {
            None | Some(serde_json::Value::Null) => {}
            Some(v) => {
                let items: Vec<serde_json::Value> = match v {
                    serde_json::Value::Array(a) => a.clone(),
                    serde_json::Value::Object(o) => o.values().cloned().collect(),
                    other => {
                        return Err(Error::Model(format!(
                            "tokenizer_config.json: extra_special_tokens should be a list or an object, found {other}"
                        )))
                    }
                };
                for item in items {
                    let spec: TokenSpec = serde_json::from_value(item).map_err(|e| {
                        Error::Model(format!("tokenizer_config.json: extra_special_tokens: {e}"))
                    })?;
                    named.push(spec);
                }
            }
        }
        for token in named {
            if decoder_contents.iter().any(|c| c == token.content()) {
                continue;
            }
            specs.push(match token {
                // A string becomes `AddedToken(text, special=True)`: matched in the raw text.
                TokenSpec::Text(content) => AddedTokenSpec {
                    content,
                    single_word: false,
                    lstrip: false,
                    rstrip: false,
                    normalized: Some(false),
                    special: Some(true),
                },
                TokenSpec::Added(mut a) => {
                    a.normalized = Some(a.normalized.unwrap_or(false));
                    a
                }
            });
        }

        let mut added: Vec<AddedToken> = Vec::new();
        let mut max_new_id: Option<u32> = None;
        let vocab_size = vocab.len() as u32;
        for spec in specs {
            if spec.content.is_empty() {
                continue;
            }
            let flags = |id| AddedToken {
                content: spec.content.clone(),
                id,
                single_word: spec.single_word,
                lstrip: spec.lstrip,
                rstrip: spec.rstrip,
                normalized: spec.normalized.unwrap_or(false),
            };
            if let Some(existing) = added.iter_mut().find(|t| t.content == spec.content) {
                *existing = flags(existing.id);
                continue;
            }
            let id = match vocab.get(&spec.content) {
                Some(&id) => id,
                None => {
                    let id = match max_new_id {
                        Some(m) if m >= vocab_size => m + 1,
                        _ => vocab_size,
                    };
                    max_new_id = Some(id);
                    id
                }
            };
            added.push(flags(id));
        }

        let token_id = |name: &str, spec: &Option<TokenSpec>| -> Result<u32> {
            let spec = spec.as_ref().ok_or_else(|| {
                Error::Model(format!("tokenizer_config.json sets no {name}, which CLIP needs"))
            })?;
            let content = spec.content();
            added
                .iter()
                .find(|t| t.content == content)
                .map(|t| t.id)
                .or_else(|| vocab.get(content).copied())
                .ok_or_else(|| Error::Model(format!("the {name} {content:?} has no id")))
        };
        let bos_id = token_id("bos_token", &config.bos_token)?;
        let eos_id = token_id("eos_token", &config.eos_token)?;
        let pad_id = token_id("pad_token", &config.pad_token)?;
        let unk_id = config.unk_token.as_ref().and_then(|t| vocab.get(t.content()).copied());

        let (normalized_added, raw_added): (Vec<AddedToken>, Vec<AddedToken>) =
            added.into_iter().partition(|t| t.normalized);
        let normalized_added = normalized_added
            .into_iter()
            .map(|mut t| {
                t.content = normalize(&t.content);
                t
            })
            .filter(|t| !t.content.is_empty())
            .collect();

        Ok(ClipTokenizer {
            vocab,
            merges,
            raw_added,
            normalized_added,
            byte_chars: byte_alphabet().into_iter().map(String::from).collect(),
            unk_id,
            bos_id,
            eos_id,
            pad_id,
            max_length,
        })
    }

    /// The ids the text encoder gets for `prompt`: `<|startoftext|>`, the prompt's tokens cut to
    /// `max_length() - 2`, `<|endoftext|>`, then the pad token up to `max_length()`.
    pub fn encode(&self, prompt: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        let body = self.tokenize(prompt);
        ids.extend(body.iter().take(self.max_length - 2));
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        ids
    }

    /// `<|startoftext|>`, all of the prompt's tokens, `<|endoftext|>`: no truncation and no
    /// padding. Longer than `max_length()` when `encode` truncates the prompt.
    pub fn encode_unpadded(&self, prompt: &str) -> Vec<u32> {
        let body = self.tokenize(prompt);
        let mut ids = Vec::with_capacity(body.len() + 2);
        ids.push(self.bos_id);
        ids.extend(body);
        ids.push(self.eos_id);
        ids
    }

    /// The id `encode` pads with (`<|endoftext|>` for SD1, `!` for SD2).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The length of `encode`'s output (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The number of ids in the vocabulary file.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// `len(tokenizer)` in transformers: the vocabulary and the added tokens beyond it.
    pub fn len_with_added(&self) -> usize {
        let top = self.raw_added.iter().chain(&self.normalized_added).map(|t| t.id as usize + 1).max().unwrap_or(0);
        top.max(self.vocab.len())
    }

    /// The id of `token` (a vocabulary entry such as `",</w>"`, or an added token).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied().or_else(|| self.raw_added.iter().find(|t| t.content == token).map(|t| t.id)).or_else(|| {
            let n = normalize(token);
            self.normalized_added.iter().find(|t| t.content == n).map(|t| t.id)
        })
    }

    /// Adds `tokens` as transformers' `tokenizer.add_tokens` does (plain added tokens, matched
    /// in the normalised text, ids after every existing one); returns their ids. Tokens that
    /// exist already keep their ids.
    pub fn add_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(tokens.len());
        for t in tokens {
            if t.trim().is_empty() {
                return Err(Error::Input(format!("the token {t:?} is empty")));
            }
            if let Some(id) = self.token_id(t) {
                ids.push(id);
                continue;
            }
            let id = self.len_with_added() as u32;
            let content = normalize(t);
            self.normalized_added.push(AddedToken { content, id, single_word: false, lstrip: false, rstrip: false, normalized: true });
            // Longer tokens first, so one that contains another is matched whole.
            self.normalized_added.sort_by_key(|t| std::cmp::Reverse(t.content.len()));
            ids.push(id);
        }
        Ok(ids)
    }

    /// The prompt's token ids without start and end tokens, untruncated (what transformers'
    /// `tokenizer(text, add_special_tokens=False)` gives).
    pub fn tokens(&self, text: &str) -> Vec<u32> {
        self.tokenize(text)
    }

    /// The prompt's token ids, without the start and end tokens.
    fn tokenize(&self, prompt: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for (raw_piece, raw_id) in split_added(prompt, &self.raw_added) {
            if let Some(id) = raw_id {
                ids.push(id);
                continue;
            }
            let normalized = normalize(raw_piece);
            for (piece, id) in split_added(&normalized, &self.normalized_added) {
                match id {
                    Some(id) => ids.push(id),
                    None => {
                        for word in pre_tokenize(piece) {
                            self.bpe(word, &mut ids);
                        }
                    }
                }
            }
        }
        ids
    }

    /// BPE on one pre-tokenised word, as `tokenizers`' `BPE::merge_word` + `Word::merge_all`.
    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        let bytes = word.as_bytes();
        let mut ids: Vec<u32> = Vec::with_capacity(bytes.len());
        for (i, &b) in bytes.iter().enumerate() {
            let ch = &self.byte_chars[b as usize];
            let id = if i + 1 == bytes.len() {
                self.vocab.get(&format!("{ch}</w>")).copied()
            } else {
                self.vocab.get(ch.as_str()).copied()
            };
            // Missing characters become the unknown token (one each), or vanish without one.
            if let Some(id) = id.or(self.unk_id) {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            return;
        }

        #[derive(Clone, Copy)]
        struct Symbol {
            id: u32,
            prev: isize,
            next: isize,
            alive: bool,
        }
        #[derive(PartialEq, Eq)]
        struct Merge {
            pos: usize,
            rank: u32,
            new_id: u32,
        }
        impl Ord for Merge {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                // BinaryHeap pops the largest: the lowest rank, then the leftmost position.
                other.rank.cmp(&self.rank).then_with(|| other.pos.cmp(&self.pos))
            }
        }
        impl PartialOrd for Merge {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        let n = ids.len();
        let mut symbols: Vec<Symbol> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| Symbol {
                id,
                prev: i as isize - 1,
                next: if i + 1 < n { i as isize + 1 } else { -1 },
                alive: true,
            })
            .collect();
        let mut queue: BinaryHeap<Merge> = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| {
                self.merges
                    .get(&(w[0].id, w[1].id))
                    .map(|&(rank, new_id)| Merge { pos, rank, new_id })
            })
            .collect();
        while let Some(top) = queue.pop() {
            let cur = symbols[top.pos];
            if !cur.alive || cur.next < 0 {
                continue;
            }
            let next_pos = cur.next as usize;
            let right = symbols[next_pos];
            // Skip stale entries: the pair at this position must still merge into this id.
            match self.merges.get(&(cur.id, right.id)) {
                Some(&(_, new_id)) if new_id == top.new_id => {}
                _ => continue,
            }
            symbols[top.pos].id = top.new_id;
            symbols[top.pos].next = right.next;
            symbols[next_pos].alive = false;
            if right.next >= 0 {
                symbols[right.next as usize].prev = top.pos as isize;
            }
            let cur = symbols[top.pos];
            if cur.prev >= 0 {
                let prev = cur.prev as usize;
                if let Some(&(rank, new_id)) = self.merges.get(&(symbols[prev].id, cur.id)) {
                    queue.push(Merge { pos: prev, rank, new_id });
                }
            }
            if cur.next >= 0 {
                let next = cur.next as usize;
                if let Some(&(rank, new_id)) = self.merges.get(&(cur.id, symbols[next].id)) {
                    queue.push(Merge { pos: top.pos, rank, new_id });
                }
            }
        }
        out.extend(symbols.iter().filter(|s| s.alive).map(|s| s.id));
    }
}

/// CLIP's normaliser: NFC, whitespace runs to one space, then per-character lower case.
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for (c, _) in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

fn is_letter(c: char) -> bool {
    c.general_category_group() == GeneralCategoryGroup::Letter
}

fn is_number(c: char) -> bool {
    c.general_category_group() == GeneralCategoryGroup::Number
}

/// Regex `\w` (Unicode): alphabetic, marks, decimal digits, connector punctuation, joiners.
fn is_word_char(c: char) -> bool {
    c.is_alphabetic()
        || matches!(
            c.general_category(),
            GeneralCategory::NonspacingMark
                | GeneralCategory::SpacingMark
                | GeneralCategory::EnclosingMark
                | GeneralCategory::DecimalNumber
                | GeneralCategory::ConnectorPunctuation
        )
        || c == '\u{200C}'
        || c == '\u{200D}'
}

/// The matches of `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|`
/// `[^\s\p{L}\p{N}]+` in `text`, in order, each then split again by GPT-2's byte-level pattern
/// (which only changes the first two alternatives' matches).
fn pre_tokenize(text: &str) -> Vec<&str> {
    const SPECIALS: [&str; 2] = ["<|startoftext|>", "<|endoftext|>"];
    const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c.is_whitespace() {
            rest = &rest[c.len_utf8()..];
            continue;
        }
        // The pattern's first alternatives: the special tokens' texts, kept whole here and cut
        // by the byte-level GPT-2 split into `<|`, the word, `|>`. They matter when punctuation
        // follows (`<|endoftext|>-` gives `|>` and `-`, not `|>-`).
        if let Some(special) = SPECIALS.iter().find(|s| rest.starts_with(**s)) {
            let word_end = special.len() - 2;
            pieces.extend([&rest[..2], &rest[2..word_end], &rest[word_end..special.len()]]);
            rest = &rest[special.len()..];
            continue;
        }
        let len = if let Some(k) = CONTRACTIONS.iter().find(|k| rest.starts_with(**k)) {
            k.len()
        } else if is_letter(c) {
            rest.find(|ch: char| !is_letter(ch)).unwrap_or(rest.len())
        } else if is_number(c) {
            c.len_utf8()
        } else {
            rest.find(|ch: char| ch.is_whitespace() || is_letter(ch) || is_number(ch))
                .unwrap_or(rest.len())
        };
        pieces.push(&rest[..len]);
        rest = &rest[len..];
    }
    pieces
}

/// Splits `text` around the added tokens as `tokenizers`' `AddedVocabulary::split_with_indices`:
/// non-overlapping leftmost-longest matches, dropped when `single_word` finds a word character
/// beside them, widened over whitespace by `lstrip` / `rstrip`. Pieces come with the token's id
/// when they are one.
pub(super) fn split_added<'a>(text: &'a str, tokens: &[AddedToken]) -> Vec<(&'a str, Option<u32>)> {
    if tokens.is_empty() || text.is_empty() {
        return vec![(text, None)];
    }
    let mut splits = Vec::new();
    let mut start_offset = 0;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        let best = tokens
            .iter()
            .filter(|t| rest.starts_with(t.content.as_str()))
            .max_by_key(|t| t.content.len());
        let Some(token) = best else {
            pos += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let (mut start, mut stop) = (pos, pos + token.content.len());
        pos = stop;
        if token.single_word {
            let word_before = text[..start].chars().next_back().is_some_and(is_word_char);
            let word_after = text[stop..].chars().next().is_some_and(is_word_char);
            if word_before || word_after {
                continue;
            }
        }
        if token.lstrip {
            let trimmed = text[..start].trim_end_matches(char::is_whitespace).len();
            start = trimmed.max(start_offset);
        }
        if token.rstrip {
            let after = &text[stop..];
            stop += after.len() - after.trim_start_matches(char::is_whitespace).len();
            pos = stop;
        }
        if start_offset < start {
            splits.push((&text[start_offset..start], None));
        }
        splits.push((&text[start..stop], Some(token.id)));
        start_offset = stop;
    }
    if start_offset < text.len() {
        splits.push((&text[start_offset..], None));
    }
    splits
}

/// GPT-2's map from bytes to printable characters: the printable Latin-1 bytes stand for
/// themselves, the others take the code points from 256 up, in byte order.
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            b as u32
        } else {
            let c = next;
            next += 1;
            c
        };
        table[b as usize] = char::from_u32(code).unwrap_or('\0');
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny vocabulary: the byte alphabet with and without `</w>`, a few merges, and the two
    /// special tokens at the end, as CLIP's files are laid out.
    fn tiny() -> (String, String) {
        let alphabet = byte_alphabet();
        let mut vocab: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
        vocab.extend(alphabet.iter().map(|c| format!("{c}</w>")));
        let merges = [("c", "a"), ("ca", "t</w>"), ("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>")];
        for (a, b) in merges {
            vocab.push(format!("{a}{b}"));
        }
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let map: serde_json::Map<String, serde_json::Value> =
            vocab.iter().enumerate().map(|(i, t)| (t.clone(), (i as u64).into())).collect();
        let mut merges_txt = String::from("#version: 0.2\n");
        for (a, b) in merges {
            merges_txt.push_str(&format!("{a} {b}\n"));
        }
        (serde_json::Value::Object(map).to_string(), merges_txt)
    }

    fn tokenizer(config: &str) -> ClipTokenizer {
        let (vocab, merges) = tiny();
        ClipTokenizer::from_files(&vocab, &merges, TokenizerConfig::from_json(config).expect("config"))
            .expect("tokenizer")
    }

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let t = byte_alphabet();
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[b' ' as usize], '\u{120}');
        assert_eq!(t[0], '\u{100}');
        assert_eq!(t[0xAD], '\u{143}');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn encodes_pads_and_truncates_like_clip() {
        let t = tokenizer("{}");
        let (bos, eos) = (t.bos_id(), t.eos_id());
        assert_eq!((bos, eos, t.pad_id(), t.max_length()), (518, 519, 519, 77));
        // Byte b's character has id b, with </w> 256 + b. "cat" -> c a t</w> -> ca t</w> ->
        // cat</w> (513); "hello" -> hello</w> (517); "," -> ,</w>; "!" -> !</w>
        let ids = t.encode("  Hello, CAT!\n");
        assert_eq!(&ids[..6], &[bos, 517, 256 + b',' as u32, 513, 256 + b'!' as u32, eos]);
        assert!(ids[6..].iter().all(|&i| i == eos));
        assert_eq!(ids.len(), 77);
        let long = "cat ".repeat(100);
        let ids = t.encode(&long);
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], eos);
        assert!(ids[1..76].iter().all(|&i| i == 513));
        assert_eq!(t.encode_unpadded(&long).len(), 102);
        assert_eq!(t.encode(""), {
            let mut v = vec![bos, eos];
            v.resize(77, eos);
            v
        });
    }

    #[test]
    fn sd2_pad_token_is_cut_out_of_the_prompt() {
        let t = tokenizer(r#"{"pad_token": "!", "model_max_length": 8}"#);
        let bang = b'!' as u32;
        assert_eq!(t.pad_id(), bang);
        // "!" is an added token, so it is not "!</w>" (256 + b'!') as in SD1.
        assert_eq!(t.encode("cat!"), vec![518, 513, bang, 519, bang, bang, bang, bang]);
    }

    #[test]
    fn special_token_flags_follow_transformers() {
        // SD1: the eos object says normalized, the later pad string does not: raw matching only.
        let sd1 = tokenizer(
            r#"{"eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "normalized": true},
                "pad_token": "<|endoftext|>"}"#,
        );
        assert_eq!(sd1.encode_unpadded("a<|endoftext|>b"), vec![518, 256 + b'a' as u32, 519, 256 + b'b' as u32, 519]);
        assert!(sd1.encode_unpadded("<|ENDOFTEXT|>").len() > 3);
        // SD2: the pad is "!" and unk the same object as eos, so the normalized flag stands.
        let sd2 = tokenizer(
            r#"{"eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "normalized": true},
                "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", "normalized": true},
                "pad_token": "!"}"#,
        );
        assert_eq!(sd2.encode_unpadded("<|ENDOFTEXT|>"), vec![518, 519, 519]);
    }

    #[test]
    fn pre_tokenizer_pieces() {
        assert_eq!(
            pre_tokenize("it's 42 héllo!! 東京 '''s <|endoftext|>-x -<|startoftext|>"),
            vec![
                "it", "'s", "4", "2", "héllo", "!!", "東京", "'''", "s", "<|", "endoftext", "|>", "-",
                "x", "-<|", "startoftext", "|>",
            ]
        );
    }

    #[test]
    fn normalizes_nfc_whitespace_and_case() {
        assert_eq!(normalize("Cafe\u{301}\t\u{a0} ΣΑΣ"), "café σασ");
    }

    #[test]
    fn bad_files_are_model_errors() {
        let (vocab, merges) = tiny();
        let config = TokenizerConfig::default;
        assert!(matches!(ClipTokenizer::from_files("{", &merges, config()), Err(Error::Model(_))));
        assert!(matches!(ClipTokenizer::from_files(&vocab, "a b c\n", config()), Err(Error::Model(_))));
        assert!(matches!(ClipTokenizer::from_files(&vocab, "zz q\n", config()), Err(Error::Model(_))));
        assert!(matches!(ClipTokenizer::from_files("{}", "", config()), Err(Error::Model(_))));
        assert!(matches!(TokenizerConfig::from_json("[1]"), Err(Error::Model(_))));
        for bad in ["1e30", "1000000000000000019884624838656", "76.5", "-3", "1", "\"77\""] {
            let json = format!(r#"{{"model_max_length": {bad}}}"#);
            assert!(matches!(TokenizerConfig::from_json(&json), Err(Error::Model(_))), "{bad}");
        }
        assert_eq!(TokenizerConfig::from_json(r#"{"model_max_length": 77.0}"#).map(|c| c.model_max_length).ok(), Some(77));
        assert!(matches!(
            ClipTokenizer::from_tokenizer_json(r#"{"model": {"type": "Unigram", "vocab": {}}}"#, config()),
            Err(Error::Model(_))
        ));
        let no_pad = TokenizerConfig { pad_token: None, ..TokenizerConfig::default() };
        assert!(matches!(ClipTokenizer::from_files(&vocab, &merges, no_pad), Err(Error::Model(_))));
    }

    /// `tests/fixtures/ref/tokens.json`: transformers' ids for the fixture models' tokenizers.
    #[test]
    fn matches_fixture_token_ids() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let read = |p: &str| std::fs::read_to_string(format!("{root}/{p}")).expect(p);
        let reference: serde_json::Value = serde_json::from_str(&read("ref/tokens.json")).expect("tokens.json");
        let mut checked = 0;
        for model in ["sd1", "sd2"] {
            let dir = format!("{model}/tokenizer");
            let config = || TokenizerConfig::from_json(&read(&format!("{dir}/tokenizer_config.json"))).expect("config");
            let from_files = ClipTokenizer::from_files(
                &read(&format!("{dir}/vocab.json")),
                &read(&format!("{dir}/merges.txt")),
                config(),
            )
            .expect("vocab.json + merges.txt");
            let from_json = ClipTokenizer::from_tokenizer_json(&read(&format!("{dir}/tokenizer.json")), config())
                .expect("tokenizer.json");
            for case in reference[model].as_array().expect("cases") {
                let prompt = case["prompt"].as_str().expect("prompt");
                let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
                assert_eq!(from_files.encode(prompt), want, "{model}: {prompt:?}");
                assert_eq!(from_json.encode(prompt), want, "{model} (tokenizer.json): {prompt:?}");
                checked += 1;
            }
        }
        assert!(checked >= 2, "no fixture prompts");
    }

    #[test]
    fn tokenizer_json_gives_the_same_ids() {
        let (vocab, merges) = tiny();
        let pairs: Vec<[&str; 2]> = merges
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(' ').map(|(a, b)| [a, b]))
            .collect();
        let json = format!(
            r#"{{"model": {{"type": "BPE", "vocab": {vocab}, "merges": {}}}, "added_tokens": []}}"#,
            serde_json::to_string(&pairs).unwrap_or_default()
        );
        let a = ClipTokenizer::from_tokenizer_json(&json, TokenizerConfig::default()).expect("json");
        let b = ClipTokenizer::from_files(&vocab, &merges, TokenizerConfig::default()).expect("files");
        for p in ["hello cat", "CAT's hello!!", ""] {
            assert_eq!(a.encode(p), b.encode(p));
        }
    }

    /// OpenAI CLIP's vocabulary from `assets/clip/bpe_simple_vocab_16e6.txt.gz`. The ids are
    /// transformers 5.24.0's `CLIPTokenizer` (tokenizers 0.23.3), loaded from a `vocab.json` and
    /// `merges.txt` written from the same file as simple_tokenizer.py reads it, with the
    /// `tokenizer_config.json` of SD 1.5 and of SD 2.1.
    #[test]
    fn clip_bpe_matches_transformers() {
        use std::io::Read;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/clip/bpe_simple_vocab_16e6.txt.gz");
        let gz = std::fs::read(path).expect(path);
        let mut text = String::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut text).expect("gunzip");
        let sd1 = ClipTokenizer::from_clip_bpe(&text, ClipPad::EndOfText).expect("SD 1.x tokenizer");
        let sd2 = ClipTokenizer::from_clip_bpe(&text, ClipPad::Exclamation).expect("SD 2.x tokenizer");
        let info = |t: &ClipTokenizer| (t.vocab_size(), t.bos_id(), t.eos_id(), t.pad_id(), t.max_length());
        assert_eq!(info(&sd1), (49408, 49406, 49407, 49407, 77));
        assert_eq!(info(&sd2), (49408, 49406, 49407, 0, 77));
        let padded = |ids: &[u32], pad: u32| {
            let mut v = ids.to_vec();
            v.resize(77, pad);
            v
        };
        let astronaut = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407];
        let prompt = "a photo of an astronaut riding a horse on mars";
        assert_eq!(sd1.encode(prompt), padded(&astronaut, 49407));
        assert_eq!(sd2.encode(prompt), padded(&astronaut, 0));
        // (prompt, SD 1.x ids, SD 2.x ids where they differ)
        type Case = (&'static str, &'static [u32], Option<&'static [u32]>);
        let cases: &[Case] = &[
            ("Hello, World!", &[49406, 3306, 267, 1002, 256, 49407], Some(&[49406, 3306, 267, 1002, 0, 49407])),
            ("wow!!! really?! yes!?", &[49406, 2781, 995, 1414, 2835, 1958, 6004, 49407], Some(&[49406, 2781, 0, 0, 0, 1414, 286, 0, 1958, 0, 286, 49407])),
            ("It's a dog's life; they're here, we've gone, I'm sure you'll see, he'd say", &[49406, 585, 568, 320, 1929, 568, 970, 282, 889, 982, 763, 267, 649, 1200, 3601, 267, 328, 880, 1650, 592, 1342, 862, 267, 797, 1896, 1451, 49407], None),
            ("3.14159 2,000,000 1e-5 0x1F -42 +7 100% $99.99 #1", &[49406, 274, 269, 272, 275, 272, 276, 280, 273, 267, 271, 271, 271, 267, 271, 271, 271, 272, 324, 268, 276, 271, 343, 272, 325, 268, 275, 273, 266, 278, 272, 271, 271, 260, 259, 280, 280, 269, 280, 280, 258, 272, 49407], None),
            ("café naïve résumé façade jalapeño Ångström", &[49406, 15304, 1097, 35689, 563, 29106, 7054, 4166, 778, 10067, 1928, 43017, 23176, 10352, 807, 7255, 332, 49407], None),
            ("Cafe\u{301} e\u{301}le\u{300}ve", &[49406, 15304, 3459, 75, 12138, 563, 49407], None),
            ("東京の夜景、ネオン、雨", &[49406, 48338, 21078, 105, 21575, 23170, 250, 48132, 363, 45262, 2429, 235, 3909, 103, 26875, 45262, 165, 249, 357, 49407], None),
            ("😀 😃 😄 a dog 🐶 and a cat 🐱", &[49406, 7334, 8520, 7624, 320, 1929, 10631, 537, 320, 2368, 22979, 49407], None),
            ("<|StartOfText|> hi", &[49406, 49406, 1883, 49407], None),
            ("<|ENDOFTEXT|> hi", &[49406, 27, 347, 40786, 4160, 91, 285, 1883, 49407], Some(&[49406, 49407, 1883, 49407])),
            ("a<|endoftext|>b", &[49406, 320, 49407, 321, 49407], None),
            ("masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, (blue eyes:1.2), [red hair]", &[49406, 12066, 267, 949, 3027, 267, 272, 1611, 267, 5797, 267, 1538, 2225, 267, 1312, 536, 15061, 267, 3490, 267, 263, 1746, 3095, 281, 272, 269, 273, 2361, 314, 736, 2225, 316, 49407], None),
            ("", &[49406, 49407], None),
        ];
        for &(prompt, want1, want2) in cases {
            let want2 = want2.unwrap_or(want1);
            assert_eq!(sd1.encode_unpadded(prompt), want1, "SD 1.x: {prompt:?}");
            assert_eq!(sd2.encode_unpadded(prompt), want2, "SD 2.x: {prompt:?}");
            assert_eq!(sd1.encode(prompt), padded(want1, 49407), "SD 1.x: {prompt:?}");
            assert_eq!(sd2.encode(prompt), padded(want2, 0), "SD 2.x: {prompt:?}");
        }
        // 90 tokens, cut to 75.
        let long = "the quick brown fox jumps over the lazy dog ".repeat(10);
        let full = sd1.encode_unpadded(&long);
        assert_eq!(full.len(), 92);
        assert_eq!(&full[..10], &[49406, 518, 3712, 2866, 3240, 18911, 962, 518, 10753, 1929]);
        for t in [&sd1, &sd2] {
            let ids = t.encode(&long);
            assert_eq!((ids.len(), &ids[..76], ids[76]), (77, &full[..76], 49407));
        }

        // The tokenizer folder `ldm convert` writes reads back as the same tokenizer.
        for (pad, built) in [(ClipPad::EndOfText, &sd1), (ClipPad::Exclamation, &sd2)] {
            let files = clip_bpe_files(&text, pad).expect("tokenizer files");
            let file = |n: &str| files.iter().find(|(f, _)| *f == n).map(|(_, t)| t.as_str()).expect("written");
            let config = TokenizerConfig::from_json(file("tokenizer_config.json")).expect("config");
            assert_eq!(config, pad.tokenizer_config(), "{pad:?}");
            let read = ClipTokenizer::from_files(file("vocab.json"), file("merges.txt"), config).expect("reads back");
            assert_eq!(info(&read), info(built), "{pad:?}");
            for prompt in cases.iter().map(|c| c.0).chain([long.as_str()]) {
                assert_eq!(read.encode(prompt), built.encode(prompt), "{pad:?}: {prompt:?}");
            }
        }

        // Other texts are refused.
        let bad = |text: &str| matches!(ClipTokenizer::from_clip_bpe(text, ClipPad::EndOfText), Err(Error::Model(_)));
        assert!(bad(""));
        let head: String = text.split_inclusive('\n').take(1000).collect();
        assert!(bad(&head), "too few merges");
        assert!(bad(&text.replacen("\ni n\n", "\ni n x\n", 1)), "three parts");
        assert!(bad(&text.replacen("\nt h\n", "\ni n\n", 1)), "a repeated merge");
        assert!(!bad(&text.replace('\n', "\r\n")), "CRLF");
    }
}
