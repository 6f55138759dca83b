//! Any text as a prompt: A1111's emphasis parser and CLIP's tokenizer (OpenAI's vocabulary).
#![no_main]

use std::io::Read;
use std::sync::OnceLock;

use ldm_web::pipelines::prompt::a1111;
use ldm_web::tokenizer::{ClipPad, ClipTokenizer};
use libfuzzer_sys::fuzz_target;

fn tokenizer() -> &'static ClipTokenizer {
    static T: OnceLock<ClipTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let gz = include_bytes!("../../../assets/clip/bpe_simple_vocab_16e6.txt.gz");
        let mut text = String::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut text).expect("the CLIP vocabulary unpacks");
        ClipTokenizer::from_clip_bpe(&text, ClipPad::EndOfText).expect("the CLIP vocabulary loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for (piece, weight) in a1111::parse(&text) {
        assert!(weight.is_finite(), "weight {weight} for {piece:?}");
        let _ = tokenizer().encode_unpadded(&piece);
    }
    let ids = tokenizer().encode(&text);
    assert_eq!(ids.len(), tokenizer().max_length());
});
