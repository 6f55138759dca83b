//! BERT's WordPiece tokenizer, giving the ids of transformers' `BertTokenizer` as diffusers'
//! `LDMTextToImagePipeline` calls it:
//! `tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids`.
//!
//! What transformers 5 (backed by `tokenizers`) does, and this module reproduces:
//! 1. the special tokens (`[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`) are cut out of the raw
//!    text first (leftmost-longest, case-sensitive);
//! 2. `BertNormalizer`: control characters, NUL and U+FFFD are dropped and whitespace becomes a
//!    space; CJK ideographs get a space on each side; with lower-casing (the default) accents are
//!    stripped (NFD, then non-spacing marks dropped) and each character is lower-cased;
//! 3. `BertPreTokenizer`: split on whitespace (dropped) and around every punctuation character
//!    (ASCII punctuation or a Unicode `P*` character, each its own piece);
//! 4. WordPiece: the longest vocabulary prefix, then the longest `##`-prefixed continuation,
//!    and so on; a word that cannot be covered, or of more than 100 characters, is `[UNK]`;
//! 5. `[CLS]` + ids cut to `max_length - 2` + `[SEP]`, padded with `[PAD]` to `max_length`.
//!
//! Character classes come from `unicode-properties` (Unicode 16). `tokenizers` takes "control"
//! from an older table, so code points assigned since (e.g. emoji newer than Unicode 9) may be
//! dropped there and `[UNK]` here; every character of `tests/fixtures/ref/bert_tokens.json` agrees.

use std::collections::HashMap;

use serde::Deserialize;
use unicode_normalization_alignments::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

use super::clip::{split_added, AddedToken, TokenSpec};
use crate::error::{Error, Result};

/// `tokenizer_config.json` of a BERT tokenizer, as far as encoding needs it.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct BertTokenizerConfig {
    pub do_lower_case: bool,
    /// `None`: strip accents exactly when lower-casing.
    pub strip_accents: Option<bool>,
    pub tokenize_chinese_chars: bool,
    pub unk_token: TokenSpec,
    pub sep_token: TokenSpec,
    pub pad_token: TokenSpec,
    pub cls_token: TokenSpec,
    pub mask_token: TokenSpec,
}

impl Default for BertTokenizerConfig {
    fn default() -> Self {
        let t = |s: &str| TokenSpec::Text(s.to_string());
        Self {
            do_lower_case: true, strip_accents: None, tokenize_chinese_chars: true,
            unk_token: t("[UNK]"), sep_token: t("[SEP]"), pad_token: t("[PAD]"), cls_token: t("[CLS]"), mask_token: t("[MASK]"),
        }
    }
}

/// The WordPiece tokenizer of an LDM text-to-image model.
#[derive(Debug, Clone)]
pub struct BertTokenizer {
    vocab: HashMap<String, u32>,
    special: Vec<AddedToken>,
    unk_id: u32,
    cls_id: u32,
    sep_id: u32,
    pad_id: u32,
    lowercase: bool,
    strip_accents: bool,
    chinese_chars: bool,
}

const MAX_INPUT_CHARS_PER_WORD: usize = 100;

impl BertTokenizer {
    /// Builds the tokenizer from `vocab.txt` (one token per line, ids by line) and the config.
    pub fn from_vocab_txt(vocab_txt: &str, config: &BertTokenizerConfig) -> Result<Self> {
        let mut vocab = HashMap::new();
        let body = vocab_txt.strip_suffix('\n').unwrap_or(vocab_txt);
        for (i, line) in body.split('\n').enumerate() {
            vocab.insert(line.to_string(), i as u32);
        }
        Self::from_vocab(vocab, config)
    }

    /// Builds the tokenizer from a vocabulary map (e.g. `tokenizer.json`'s `model.vocab`).
    pub fn from_vocab(vocab: HashMap<String, u32>, config: &BertTokenizerConfig) -> Result<Self> {
        let id = |spec: &TokenSpec, what: &str| {
            vocab.get(spec.content()).copied().ok_or_else(|| Error::Model(format!("tokenizer: the {what} {:?} is not in vocab.txt", spec.content())))
        };
        let (unk_id, cls_id, sep_id, pad_id) = (id(&config.unk_token, "unk_token")?, id(&config.cls_token, "cls_token")?, id(&config.sep_token, "sep_token")?, id(&config.pad_token, "pad_token")?);
        let special = [&config.pad_token, &config.unk_token, &config.cls_token, &config.sep_token, &config.mask_token]
            .iter()
            .filter_map(|t| vocab.get(t.content()).map(|&id| AddedToken { content: t.content().to_string(), id, single_word: false, lstrip: false, rstrip: false, normalized: false }))
            .collect();
        Ok(Self {
            vocab, special, unk_id, cls_id, sep_id, pad_id,
            lowercase: config.do_lower_case, strip_accents: config.strip_accents.unwrap_or(config.do_lower_case), chinese_chars: config.tokenize_chinese_chars,
        })
    }

    /// `[CLS]` + ids + `[SEP]`, truncated and padded to `max_length` (at least 2).
    pub fn encode(&self, text: &str, max_length: usize) -> Vec<u32> {
        let body = self.encode_unpadded(text);
        let mut ids = Vec::with_capacity(max_length.max(2));
        ids.push(self.cls_id);
        ids.extend(body.iter().take(max_length.saturating_sub(2)));
        ids.push(self.sep_id);
        ids.resize(max_length.max(2), self.pad_id);
        ids
    }

    /// The ids of `text` without special tokens around them or padding.
    pub fn encode_unpadded(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for (piece, special) in split_added(text, &self.special) {
            if let Some(id) = special {
                ids.push(id);
                continue;
            }
            for word in pre_tokenize(&self.normalize(piece)) {
                self.word_piece(word, &mut ids);
            }
        }
        ids
    }

    /// The vocabulary's size.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    fn normalize(&self, text: &str) -> String {
        let mut s: String = text
            .chars()
            .filter(|&c| !(c == '\0' || c == '\u{fffd}' || is_control(c)))
            .map(|c| if is_whitespace(c) { ' ' } else { c })
            .collect();
        if self.chinese_chars {
            s = s.chars().flat_map(|c| if is_chinese_char(c) { vec![' ', c, ' '] } else { vec![c] }).collect();
        }
        if self.strip_accents {
            s = s.nfd().map(|(c, _)| c).filter(|c| c.general_category() != GeneralCategory::NonspacingMark).collect();
        }
        if self.lowercase {
            s = s.chars().flat_map(char::to_lowercase).collect();
        }
        s
    }

    fn word_piece(&self, word: &str, ids: &mut Vec<u32>) {
        if word.chars().count() > MAX_INPUT_CHARS_PER_WORD {
            ids.push(self.unk_id);
            return;
        }
        let mark = ids.len();
        let mut start = 0;
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                let sub = &word[start..end];
                let key = if start > 0 { format!("##{sub}") } else { sub.to_string() };
                if let Some(&id) = self.vocab.get(&key) {
                    found = Some(id);
                    break;
                }
                end -= sub.chars().next_back().map_or(1, char::len_utf8);
            }
            let Some(id) = found else {
                ids.truncate(mark);
                ids.push(self.unk_id);
                return;
            };
            ids.push(id);
            start = end;
        }
    }
}

/// Whitespace splits (dropped), then every punctuation character is a piece of its own.
fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for word in text.split(char::is_whitespace).filter(|w| !w.is_empty()) {
        let mut start = 0;
        for (i, c) in word.char_indices() {
            if is_punctuation(c) {
                if start < i {
                    out.push(&word[start..i]);
                }
                out.push(&word[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        if start < word.len() {
            out.push(&word[start..]);
        }
    }
    out
}

fn is_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && c.general_category_group() == GeneralCategoryGroup::Other
}

fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || c.general_category_group() == GeneralCategoryGroup::Punctuation
}

/// The CJK Unified Ideographs blocks BERT pads with spaces (not Hangul or kana).
fn is_chinese_char(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> BertTokenizer {
        let vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\napple\n##s\n##le\napp\n,\n.\nthe\ncafe\n!\n";
        BertTokenizer::from_vocab_txt(vocab, &BertTokenizerConfig::default()).expect("tokenizer")
    }

    // Expected ids from transformers 5.24 BertTokenizer on the same vocab.txt.
    #[test]
    fn matches_transformers_on_a_tiny_vocab() {
        let t = tiny();
        assert_eq!(t.encode("A red Apple, apples!", 12), [2, 5, 6, 7, 11, 7, 8, 15, 3, 0, 0, 0]);
        assert_eq!(t.encode("Café the [MASK] [mask] x", 12), [2, 14, 13, 4, 1, 1, 1, 1, 3, 0, 0, 0]);
        assert_eq!(t.encode("a\u{e9}\u{301} \u{4e2d}\u{6587}", 12), [2, 1, 1, 1, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(t.encode("applele", 12), [2, 7, 9, 3, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(t.encode("", 4), [2, 3, 0, 0]);
        assert_eq!(t.encode("red red red red", 4), [2, 6, 6, 3]);
    }
}
