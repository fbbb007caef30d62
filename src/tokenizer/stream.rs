//! Incremental decoding of generated tokens into whole UTF-8 characters.

use super::Tokenizer;

/// Turns a stream of token ids into text without ever emitting half a character.
///
/// Llama 3 tokens are byte sequences, so one character (an emoji, a CJK ideograph)
/// can span several tokens. Bytes that end mid-character are held until the next
/// token completes them. Invalid bytes become U+FFFD exactly as in
/// [`Tokenizer::decode`], so the concatenated output of `push` and `finish` equals
/// `decode` of all ids (of all ids but the special ones, when skipping them).
///
/// Special tokens come out as their text (`<|eot_id|>`) from [`StreamDecoder::new`];
/// [`StreamDecoder::skipping_special`] leaves them out, as HF's and vLLM's
/// `skip_special_tokens` do: a model's text should not show `<|reserved_special_token_163|>`.
/// Either way the caller's token ids are untouched; only the text differs.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    skip_special: bool,
}

impl StreamDecoder {
    /// An empty decoder that writes special tokens as their text.
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// An empty decoder that leaves special tokens out of the text when `skip` is true
    /// (the same as [`StreamDecoder::new`] when false).
    pub fn skipping_special(skip: bool) -> StreamDecoder {
        StreamDecoder {
            pending: Vec::new(),
            skip_special: skip,
        }
    }

    /// Adds one token and returns the text it completes (possibly empty). Unknown
    /// ids are skipped, as in [`Tokenizer::decode_bytes`], and so are special tokens
    /// when skipping them (bytes of a character cut short stay held across them).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if self.skip_special && tok.is_special(id) {
            return String::new();
        }
        if let Some(b) = tok.token_bytes(id) {
            self.pending.extend_from_slice(b);
        }
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, tail) = rest.split_at(e.valid_up_to());
                    // `valid` is checked UTF-8, so this borrows without replacing.
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // Bytes that can never become valid: replace, as decode does.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &tail[n..];
                        }
                        // A character cut short: wait for more bytes.
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        let keep = self.pending.len() - rest.len();
        self.pending.drain(..keep);
        out
    }

    /// Returns whatever is still held, incomplete characters as U+FFFD, and resets.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Whether bytes of an unfinished character are being held.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::bpe::{meta_special_tokens, Vocab};
    use std::path::Path;

    /// A tokenizer whose ids 0..256 are single bytes, plus two multi-byte tokens,
    /// so characters can be split across tokens at any byte.
    fn byte_tokenizer() -> Tokenizer {
        let mut ranks: std::collections::HashMap<Vec<u8>, u32> =
            (0u8..=255).map(|b| (vec![b], u32::from(b))).collect();
        // "é" + first byte of "中", and the remaining two bytes of "中".
        ranks.insert(vec![0xC3, 0xA9, 0xE4], 256);
        ranks.insert(vec![0xB8, 0xAD], 257);
        let specials = meta_special_tokens(258).into_iter().collect();
        Tokenizer::from_vocab(Path::new("<test>"), Vocab { ranks, specials })
            .expect("test vocabulary is valid")
    }

    fn run(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut d = StreamDecoder::new();
        let mut out: Vec<String> = ids.iter().map(|&id| d.push(tok, id)).collect();
        out.push(d.finish());
        out
    }

    #[test]
    fn emoji_split_into_single_bytes() {
        let tok = byte_tokenizer();
        // Thumbs up with skin tone: two 4-byte code points.
        let text = "a👍🏽b";
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        let out = run(&tok, &ids);
        assert_eq!(out[0], "a");
        assert_eq!(out[1..4], ["", "", ""]);
        assert_eq!(out[4], "👍");
        assert_eq!(out[5..8], ["", "", ""]);
        assert_eq!(out[8], "🏽");
        assert_eq!(out[9], "b");
        assert_eq!(out[10], "");
        assert_eq!(out.concat(), text);
    }

    #[test]
    fn cjk_split_mid_token() {
        let tok = byte_tokenizer();
        // "é中" as [é + 0xE4] [0xB8 0xAD]: the first token completes é and starts 中.
        let out = run(&tok, &[256, 257, u32::from(b'!')]);
        assert_eq!(out, ["é", "中", "!", ""]);
    }

    #[test]
    fn zwj_sequence_and_decode_agree() {
        let tok = byte_tokenizer();
        let text = "家族: 👨‍👩‍👧‍👦 ok";
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        let out = run(&tok, &ids);
        assert!(out.iter().all(|s| !s.contains('\u{FFFD}')));
        assert_eq!(out.concat(), text);
        assert_eq!(tok.decode(&ids), text);
    }

    #[test]
    fn invalid_and_truncated_bytes_match_lossy_decode() {
        let tok = byte_tokenizer();
        // A stray continuation byte, a valid char, then a cut-off 3-byte lead.
        let ids = [0x80, u32::from(b'x'), 0xE4, 0xB8];
        let out = run(&tok, &ids);
        assert_eq!(out, ["\u{FFFD}", "x", "", "", "\u{FFFD}"]);
        assert_eq!(out.concat(), tok.decode(&ids));
    }

    #[test]
    fn unknown_ids_are_skipped_and_specials_are_text() {
        let tok = byte_tokenizer();
        let eot = tok.eot_id();
        let out = run(&tok, &[u32::from(b'h'), 999_999, eot]);
        assert_eq!(out, ["h", "", "<|eot_id|>", ""]);
        assert!(tok.try_decode_bytes(&[999_999]).is_err());
    }

    #[test]
    fn skipping_special_leaves_them_out_of_the_text_only() {
        let tok = byte_tokenizer();
        let reserved = tok
            .special_id("<|reserved_special_token_163|>")
            .expect("Meta's specials include reserved 163");
        let ids = [u32::from(b'a'), reserved, u32::from(b'b'), tok.eot_id()];
        let mut d = StreamDecoder::skipping_special(true);
        let pieces: Vec<String> = ids.iter().map(|&id| d.push(&tok, id)).collect();
        assert_eq!(pieces, ["a", "", "b", ""]);
        assert_eq!(d.finish(), "");
        // Kept, they are their text, as before.
        let kept = run(&tok, &ids).concat();
        assert_eq!(kept, "a<|reserved_special_token_163|>b<|eot_id|>");
        assert_eq!(kept, tok.decode(&ids));
    }

    #[test]
    fn a_skipped_special_between_the_bytes_of_a_character_does_not_break_it() {
        let tok = byte_tokenizer();
        let reserved = tok
            .special_id("<|reserved_special_token_0|>")
            .expect("Meta's specials include reserved 0");
        // "中" split across a special token: skipped, the character is whole.
        let mut d = StreamDecoder::skipping_special(true);
        let out: Vec<String> = [0xE4, reserved, 0xB8, 0xAD]
            .iter()
            .map(|&id| d.push(&tok, id))
            .collect();
        assert_eq!(out.concat() + &d.finish(), "中");
        // Kept, the special token's text cuts the character: U+FFFD, as decode gives.
        let ids = [0xE4, reserved, 0xB8, 0xAD];
        assert_eq!(run(&tok, &ids).concat(), tok.decode(&ids));
    }
}
