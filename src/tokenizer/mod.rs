//! Text tokenizers: CLIP's byte-level BPE (Stable Diffusion, the built-in model) and BERT's
//! WordPiece (the latent diffusion paper's LDMBert), each giving transformers' ids exactly.

pub mod bert;
pub mod clip;

pub use bert::{BertTokenizer, BertTokenizerConfig};
pub use clip::*;
