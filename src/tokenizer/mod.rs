//! Llama 3 / 3.1 tokenizer: tiktoken BPE with Meta's special tokens, chunking and
//! chat format, plus incremental UTF-8 decoding for streamed generation.
//!
//! The tokenizer file itself is not part of the repository; `scripts/fetch-tokenizer`
//! puts Meta's `tokenizer.model` at [`default_tokenizer_path`].

mod bpe;
mod chat_format;
mod stream;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tiktoken_rs::CoreBPE;

pub use bpe::meta_special_tokens;
pub use chat_format::{Message, Role};
pub use stream::StreamDecoder;

/// Environment variable naming a tokenizer file that overrides the cache.
pub const TOKENIZER_ENV: &str = "HERD_TOKENIZER";

/// Special tokens every Llama 3 tokenizer must define (3.0 and 3.1 agree on these).
const REQUIRED_SPECIALS: [&str; 5] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];

/// Errors from loading a tokenizer or parsing chat input.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The default tokenizer file does not exist.
    #[error(
        "no tokenizer at {path} ({origin}); run `scripts/fetch-tokenizer` to download Meta's \
         tokenizer.model into the herd cache, or set HERD_TOKENIZER to a tokenizer.model or \
         tokenizer.json"
    )]
    Missing {
        /// Where we looked.
        path: PathBuf,
        /// How that path was chosen, e.g. "from HERD_TOKENIZER".
        origin: String,
    },
    /// The file could not be read.
    #[error("cannot read tokenizer {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file's contents are not a usable tokenizer.
    #[error("bad tokenizer file {path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A chat role we do not know.
    #[error("unknown chat role {0:?} (expected system, user, assistant, ipython or tool)")]
    UnknownRole(String),
    /// A token id outside the vocabulary.
    #[error("token id {0} is not in the vocabulary")]
    UnknownId(u32),
}

/// A Llama 3 tokenizer. Cheap to share: it is `Send + Sync`, wrap it in an `Arc`.
pub struct Tokenizer {
    bpe: CoreBPE,
    /// Bytes of every id (ordinary and special), indexed by id; `None` for holes.
    id_bytes: Vec<Option<Box<[u8]>>>,
    specials: HashMap<String, u32>,
    bos_id: u32,
    eos_id: u32,
    eot_id: u32,
    eom_id: Option<u32>,
    start_header_id: u32,
    end_header_id: u32,
    source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("specials", &self.specials.len())
            .finish()
    }
}

/// Where the tokenizer is looked for: `$HERD_TOKENIZER` if set, else
/// `${HERD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/herd}/tokenizer.model`
/// (empty variables count as unset, as in the shell).
pub fn default_tokenizer_path() -> PathBuf {
    default_path_with_origin().0
}

fn non_empty_env(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn default_path_with_origin() -> (PathBuf, String) {
    if let Some(p) = non_empty_env(TOKENIZER_ENV) {
        return (
            p,
            format!("from {TOKENIZER_ENV}, which overrides the cache"),
        );
    }
    let (dir, origin) = if let Some(d) = non_empty_env("HERD_CACHE") {
        (d, "the cache dir from HERD_CACHE")
    } else if let Some(d) = non_empty_env("XDG_CACHE_HOME") {
        (d.join("herd"), "the cache dir under XDG_CACHE_HOME")
    } else if let Some(d) = non_empty_env("HOME") {
        (d.join(".cache").join("herd"), "the cache dir under HOME")
    } else {
        (
            PathBuf::from(".cache").join("herd"),
            "HOME is unset, so relative to the working directory",
        )
    };
    (dir.join("tokenizer.model"), origin.to_string())
}

/// Loads the tokenizer from [`default_tokenizer_path`]; when the file is missing the
/// error says where it looked and how to fetch it.
pub fn load_default() -> Result<Tokenizer, TokenizerError> {
    let (path, origin) = default_path_with_origin();
    if !path.exists() {
        return Err(TokenizerError::Missing { path, origin });
    }
    Tokenizer::from_file(&path)
}

/// Largest tokenizer file read: Llama 3's tokenizer.model is 2.2 MB, its tokenizer.json 9 MB.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// Reads a tokenizer file, refusing one larger than [`MAX_FILE_BYTES`] before reading it whole
/// (and reading at most that much from something that is not a regular file).
fn read_bounded(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    use std::io::Read as _;
    let io = |source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_or(0, |m| m.len());
    let mut bytes = Vec::new();
    if size <= MAX_FILE_BYTES {
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
    }
    if size > MAX_FILE_BYTES || bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(TokenizerError::Parse {
            path: path.to_path_buf(),
            msg: format!(
                "larger than {} MB; a Llama 3 tokenizer.model is about 2 MB and a tokenizer.json \
                 about 9 MB (not a tokenizer, or damaged?)",
                MAX_FILE_BYTES >> 20
            ),
        });
    }
    Ok(bytes)
}

impl Tokenizer {
    /// Loads Meta's `tokenizer.model` (lines of `base64 rank`, with Meta's 256 special
    /// tokens appended) or an HF byte-level BPE `tokenizer.json` (specials from
    /// `added_tokens`). The format is detected from the contents.
    pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let bytes = read_bounded(path)?;
        let vocab = if bpe::looks_like_json(&bytes) {
            bpe::parse_hf_json(path, &bytes)?
        } else {
            bpe::parse_tiktoken(path, &bytes)?
        };
        Self::from_vocab(path, vocab)
    }

    fn from_vocab(path: &Path, vocab: bpe::Vocab) -> Result<Tokenizer, TokenizerError> {
        let bad = |msg: String| TokenizerError::Parse {
            path: path.to_path_buf(),
            msg,
        };
        let max_id = vocab
            .ranks
            .values()
            .chain(vocab.specials.values())
            .copied()
            .max()
            .unwrap_or(0);
        // The id table is sized by the largest id: a few holes are tolerated, an id far beyond
        // the number of tokens is damage (and would size the table by a number in the file).
        let count = vocab.ranks.len() + vocab.specials.len();
        let len = usize::try_from(max_id)
            .ok()
            .and_then(|m| m.checked_add(1))
            .filter(|&len| len <= 2 * count)
            .ok_or_else(|| {
                bad(format!(
                    "ids run up to {max_id} but the file defines only {count} tokens"
                ))
            })?;
        let mut id_bytes: Vec<Option<Box<[u8]>>> = vec![None; len];
        for (tok, &id) in &vocab.ranks {
            id_bytes[id as usize] = Some(tok.clone().into_boxed_slice());
        }
        for (name, &id) in &vocab.specials {
            let slot = &mut id_bytes[id as usize];
            if slot.is_some() {
                return Err(bad(format!(
                    "special token {} reuses id {id} of an ordinary token",
                    bpe::quote(name)
                )));
            }
            *slot = Some(name.as_bytes().into());
        }
        let need = |name: &str| {
            vocab.specials.get(name).copied().ok_or_else(|| {
                bad(format!(
                    "not a Llama 3 tokenizer: special token {name} is missing"
                ))
            })
        };
        for name in REQUIRED_SPECIALS {
            need(name)?;
        }
        let (bos_id, eos_id, eot_id) = (
            need("<|begin_of_text|>")?,
            need("<|end_of_text|>")?,
            need("<|eot_id|>")?,
        );
        let (start_header_id, end_header_id) =
            (need("<|start_header_id|>")?, need("<|end_header_id|>")?);
        let eom_id = vocab.specials.get("<|eom_id|>").copied();
        // BPE falls back to single bytes, so every byte needs a token (tiktoken panics on a
        // piece it cannot encode).
        if let Some(b) = (0..=255u8).find(|b| !vocab.ranks.contains_key(&[*b][..])) {
            return Err(bad(format!(
                "no token for the byte 0x{b:02x}; a byte-level BPE has one for each of the 256 \
                 bytes (truncated or damaged file?)"
            )));
        }
        // Ranks and specials were checked for duplicates, which CoreBPE::new asserts on.
        let bpe = CoreBPE::new(
            vocab.ranks.into_iter().collect(),
            vocab.specials.clone().into_iter().collect(),
            bpe::LLAMA3_PATTERN,
        )
        .map_err(|e| bad(format!("cannot build BPE: {e}")))?;
        Ok(Tokenizer {
            bpe,
            id_bytes,
            specials: vocab.specials,
            bos_id,
            eos_id,
            eot_id,
            eom_id,
            start_header_id,
            end_header_id,
            source: path.to_path_buf(),
        })
    }

    /// Encodes `text` like Meta's `Tokenizer.encode(text, bos=, eos=)`. Text that looks
    /// like a special token (e.g. `"<|eot_id|>"`) is encoded as ordinary text.
    pub fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        // Llama 3 averages a little over 4 bytes per token on English.
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if bos {
            ids.push(self.bos_id);
        }
        // Chunk as Meta does: the window edges change the result, and long runs
        // overflow the regex engine's stack.
        bpe::for_each_chunk(text, |piece| {
            ids.extend(self.bpe.encode_ordinary(piece));
        });
        if eos {
            ids.push(self.eos_id);
        }
        ids
    }

    /// Decodes ids to text; invalid UTF-8 becomes U+FFFD and unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// The concatenated bytes of `ids`. Ids outside the vocabulary are skipped (they
    /// can only come from a model whose vocabulary is larger than the tokenizer's);
    /// use [`Tokenizer::try_decode_bytes`] to treat them as an error instead.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(b) = self.token_bytes(id) {
                out.extend_from_slice(b);
            }
        }
        out
    }

    /// Like [`Tokenizer::decode_bytes`] but fails on the first unknown id.
    pub fn try_decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id).ok_or(TokenizerError::UnknownId(id))?);
        }
        Ok(out)
    }

    /// The bytes of one token (a special token's bytes are its text), or `None` for
    /// an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.id_bytes.get(id as usize)?.as_deref()
    }

    /// Number of ids (ordinary plus special): 128,256 for Llama 3.
    pub fn vocab_size(&self) -> usize {
        self.id_bytes.len()
    }

    /// The id of a special token such as `"<|eot_id|>"`.
    pub fn special_id(&self, name: &str) -> Option<u32> {
        self.specials.get(name).copied()
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.token_bytes(id)
            .and_then(|b| std::str::from_utf8(b).ok())
            .is_some_and(|s| self.specials.get(s) == Some(&id))
    }

    /// `<|begin_of_text|>` (128000).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// `<|end_of_text|>` (128001).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// `<|eot_id|>`, end of turn (128009).
    pub fn eot_id(&self) -> u32 {
        self.eot_id
    }

    /// `<|eom_id|>`, end of message (128008); Llama 3.0 files do not name it.
    pub fn eom_id(&self) -> Option<u32> {
        self.eom_id
    }

    /// Ids that end generation, as Meta's `stop_tokens`: end of text, end of message
    /// (when defined) and end of turn.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.eos_id];
        ids.extend(self.eom_id);
        ids.push(self.eot_id);
        ids
    }

    /// The file this tokenizer was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn tokenizer_is_send_sync() {
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<StreamDecoder>();
    }

    #[test]
    fn missing_file_error_names_path_and_fix() {
        let err = TokenizerError::Missing {
            path: PathBuf::from("/nowhere/tokenizer.model"),
            origin: "from HERD_TOKENIZER".into(),
        }
        .to_string();
        assert!(err.contains("/nowhere/tokenizer.model"), "{err}");
        assert!(err.contains("scripts/fetch-tokenizer"), "{err}");
        assert!(err.contains("HERD_TOKENIZER"), "{err}");
    }

    #[test]
    fn bad_files_are_rejected_with_the_path() {
        let dir = std::env::temp_dir().join(format!("herd-tok-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let cases: [(&str, &str, &str); 4] = [
            ("a.model", "QQ== 0\nQg== x\n", "line 2"),
            ("b.model", "QQ== 0\nQg== 0\n", "repeated"),
            ("c.json", "{\"model\": {\"vocab\": {}}}", "empty"),
            (
                "d.json",
                "{\"model\": {\"vocab\": {\"A\": 0}}}",
                "begin_of_text",
            ),
        ];
        for (name, body, want) in cases {
            let p = dir.join(name);
            std::fs::write(&p, body).ok();
            let err = Tokenizer::from_file(&p)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains(name) && err.contains(want), "{name}: {err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
