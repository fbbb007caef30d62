//! TEMPORARY STUB (replaced by the real tokenizer branch): byte-level ids.
use std::path::Path;
pub struct Tokenizer;
#[derive(Debug, thiserror::Error)]
#[error("tokenizer stub")]
pub struct TokenizerError;
impl Tokenizer {
    pub fn from_file(_p: &Path) -> Result<Self, TokenizerError> {
        Ok(Tokenizer)
    }
    pub fn encode(&self, text: &str, bos: bool, _eos: bool) -> Vec<u32> {
        let mut v: Vec<u32> = if bos { vec![128000] } else { vec![] };
        v.extend(text.bytes().map(|b| b as u32));
        v
    }
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect()
    }
    pub fn stop_ids(&self) -> Vec<u32> {
        vec![128001, 128008, 128009]
    }
    pub fn vocab_size(&self) -> usize {
        128256
    }
    pub fn encode_dialog(&self, m: &[Message]) -> Vec<u32> {
        m.iter()
            .flat_map(|x| self.encode(&x.content, false, false))
            .collect()
    }
    pub fn encode_message(&self, m: &Message) -> Vec<u32> {
        self.encode(&m.content, false, false)
    }
}
#[derive(Default)]
pub struct StreamDecoder {
    buf: Vec<u8>,
}
impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.buf.extend(tok.decode_bytes(&[id]));
        match std::str::from_utf8(&self.buf) {
            Ok(s) => {
                let s = s.to_string();
                self.buf.clear();
                s
            }
            Err(_) => String::new(),
        }
    }
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        s
    }
}
pub fn load_default() -> Result<Tokenizer, TokenizerError> {
    Ok(Tokenizer)
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Ipython,
}
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}
