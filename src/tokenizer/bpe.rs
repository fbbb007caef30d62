//! Loading BPE ranks from Meta's `tokenizer.model` or an HF `tokenizer.json`,
//! and Meta's input chunking.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

use super::TokenizerError;

/// The Llama 3 pre-tokenizer pattern, verbatim from Meta's `tokenizer.py`.
pub(crate) const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Meta reserves this many special ids after the base vocabulary.
pub(crate) const NUM_RESERVED_SPECIAL_TOKENS: usize = 256;

/// Most added (special) tokens a tokenizer.json may have, and their longest text.
const MAX_SPECIALS: usize = 4096;
const MAX_SPECIAL_BYTES: usize = 256;

/// Meta encodes at most this many characters (code points) per tiktoken call.
pub(crate) const MAX_ENCODE_CHARS: usize = 400_000;

/// Longest run of whitespace or of non-whitespace Meta hands to tiktoken at once;
/// longer runs make the regex backtrack deep enough to overflow the stack.
pub(crate) const MAX_RUN_CHARS: usize = 25_000;

/// The named Llama 3.1 special tokens, in id order after the base vocabulary.
const LLAMA31_NAMED_SPECIALS: [&str; 12] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
];

/// Ranks and special tokens read from a tokenizer file.
#[derive(Debug)]
pub(crate) struct Vocab {
    /// Token bytes → rank (= id) for ordinary tokens.
    pub ranks: HashMap<Vec<u8>, u32>,
    /// Special token text → id.
    pub specials: HashMap<String, u32>,
}

/// Meta's special tokens for a base vocabulary of `num_base` tokens.
pub fn meta_special_tokens(num_base: u32) -> Vec<(String, u32)> {
    let named = LLAMA31_NAMED_SPECIALS.iter().map(|s| (*s).to_string());
    // Meta numbers the remaining reserved tokens from 2 (0 and 1 are named above).
    let reserved = (0..NUM_RESERVED_SPECIAL_TOKENS - LLAMA31_NAMED_SPECIALS.len())
        .map(|i| format!("<|reserved_special_token_{}|>", i + 2));
    named
        .chain(reserved)
        .zip(num_base..)
        .collect::<Vec<(String, u32)>>()
}

/// Whether `bytes` look like JSON (an HF `tokenizer.json`) rather than tiktoken lines.
pub(crate) fn looks_like_json(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{')
}

/// At most this many characters of a file's contents are quoted in an error.
const QUOTE_CHARS: usize = 60;

/// Quotes text from a damaged file for an error message: a long line or token is cut short, so
/// that the error stays readable however long the damage is.
pub(crate) fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

/// A message that may quote the file (a parser's), cut to a readable length.
fn clip(msg: String) -> String {
    match msg.char_indices().nth(4 * QUOTE_CHARS) {
        None => msg,
        Some((cut, _)) => format!("{}...", &msg[..cut]),
    }
}

fn parse_error(path: &Path, msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Parse {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Parses Meta's tiktoken file: one `base64(token) rank` pair per line.
pub(crate) fn parse_tiktoken(path: &Path, bytes: &[u8]) -> Result<Vocab, TokenizerError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| parse_error(path, format!("not UTF-8 text ({e})")))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut ranks: HashMap<Vec<u8>, u32> = HashMap::with_capacity(130_000);
    let mut seen_ranks: HashSet<u32> = HashSet::with_capacity(130_000);
    for (lineno, line) in text.lines().enumerate() {
        let lineno = lineno + 1;
        // Like Meta, skip blank lines; unlike Meta (which logs and skips), reject bad
        // lines, since a damaged file would otherwise shift every special id.
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(tok), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(parse_error(
                path,
                format!(
                    "line {lineno}: expected `<base64 token> <rank>`, got {}",
                    quote(line)
                ),
            ));
        };
        let tok = b64.decode(tok).map_err(|e| {
            parse_error(
                path,
                format!("line {lineno}: bad base64 token {}: {e}", quote(tok)),
            )
        })?;
        let rank: u32 = rank.parse().map_err(|e| {
            parse_error(
                path,
                format!("line {lineno}: bad rank {}: {e}", quote(rank)),
            )
        })?;
        if !seen_ranks.insert(rank) {
            return Err(parse_error(
                path,
                format!("line {lineno}: rank {rank} repeated"),
            ));
        }
        if ranks.insert(tok, rank).is_some() {
            return Err(parse_error(
                path,
                format!("line {lineno}: token with rank {rank} already listed"),
            ));
        }
    }
    if ranks.is_empty() {
        return Err(parse_error(path, "no tokens in file"));
    }
    let num_base =
        u32::try_from(ranks.len()).map_err(|_| parse_error(path, "more than 2^32 tokens"))?;
    // Specials are numbered from len(ranks), so ranks must be exactly 0..len.
    if let Some(max) = seen_ranks.iter().max().filter(|&&m| m >= num_base) {
        return Err(parse_error(
            path,
            format!("ranks are not 0..{num_base}: found rank {max}"),
        ));
    }
    let specials = meta_special_tokens(num_base).into_iter().collect();
    Ok(Vocab { ranks, specials })
}

#[derive(Deserialize)]
struct HfFile {
    model: HfModel,
    #[serde(default)]
    added_tokens: Vec<HfAddedToken>,
}

#[derive(Deserialize)]
struct HfModel {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
}

#[derive(Deserialize)]
struct HfAddedToken {
    id: u32,
    content: String,
}

/// GPT-2's byte-level alphabet: the printable byte values stand for themselves, the
/// others are shifted to code points from U+0100 up, in byte order.
pub(crate) fn byte_level_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_shifted = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let cp = if printable {
            b as u32
        } else {
            let cp = next_shifted;
            next_shifted += 1;
            cp
        };
        // All values are below 0x200, far from the surrogate range.
        *slot = char::from_u32(cp).unwrap_or('\0');
    }
    table
}

/// Parses an HF byte-level BPE `tokenizer.json`.
///
/// Vocabulary ids are used as merge ranks; that holds for Llama 3's files, which
/// were converted from the tiktoken ranks. The `merges` list is therefore unused.
pub(crate) fn parse_hf_json(path: &Path, bytes: &[u8]) -> Result<Vocab, TokenizerError> {
    let file: HfFile = serde_json::from_slice(bytes).map_err(|e| {
        parse_error(
            path,
            format!("not an HF tokenizer.json: {}", clip(e.to_string())),
        )
    })?;
    if let Some(kind) = file.model.kind.as_deref().filter(|k| *k != "BPE") {
        return Err(parse_error(
            path,
            format!(
                "model.type is {}, only byte-level \"BPE\" is supported",
                quote(kind)
            ),
        ));
    }
    let mut to_byte: HashMap<char, u8> = HashMap::with_capacity(256);
    for (b, c) in (0u8..=255).zip(byte_level_alphabet()) {
        to_byte.insert(c, b);
    }
    let mut specials: HashMap<String, u32> = HashMap::new();
    let mut special_ids: HashSet<u32> = HashSet::new();
    // Special tokens become one alternation regex, whose compiled size grows with their number
    // and length (a 3 MB token took 1 GB): Llama 3 has 256 of at most 30 bytes.
    if file.added_tokens.len() > MAX_SPECIALS {
        return Err(parse_error(
            path,
            format!(
                "added_tokens: {} tokens; herd takes at most {MAX_SPECIALS}",
                file.added_tokens.len()
            ),
        ));
    }
    for t in file.added_tokens {
        if t.content.len() > MAX_SPECIAL_BYTES {
            return Err(parse_error(
                path,
                format!(
                    "added_tokens: {} is {} bytes long; herd takes at most {MAX_SPECIAL_BYTES}",
                    quote(&t.content),
                    t.content.len()
                ),
            ));
        }
        if !special_ids.insert(t.id) {
            return Err(parse_error(
                path,
                format!("added_tokens: id {} repeated", t.id),
            ));
        }
        if specials.insert(t.content.clone(), t.id).is_some() {
            return Err(parse_error(
                path,
                format!("added_tokens: {} listed twice", quote(&t.content)),
            ));
        }
    }
    let mut ranks: HashMap<Vec<u8>, u32> = HashMap::with_capacity(file.model.vocab.len());
    let mut seen_ranks: HashSet<u32> = HashSet::with_capacity(file.model.vocab.len());
    for (tok, id) in file.model.vocab {
        // Some files list the added tokens in the vocabulary as well.
        if special_ids.contains(&id) {
            continue;
        }
        let bytes = tok
            .chars()
            .map(|c| to_byte.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| {
                parse_error(
                    path,
                    format!(
                        "model.vocab: {} (id {id}) is not byte-level BPE text",
                        quote(&tok)
                    ),
                )
            })?;
        if !seen_ranks.insert(id) {
            return Err(parse_error(path, format!("model.vocab: id {id} repeated")));
        }
        if ranks.insert(bytes, id).is_some() {
            return Err(parse_error(
                path,
                format!(
                    "model.vocab: {} (id {id}) repeats another token's bytes",
                    quote(&tok)
                ),
            ));
        }
    }
    if ranks.is_empty() {
        return Err(parse_error(path, "model.vocab is empty"));
    }
    Ok(Vocab { ranks, specials })
}

/// Python's `str.isspace()`, which Meta's chunking and `str.strip()` use. It differs
/// from [`char::is_whitespace`] in also counting U+001C..U+001F.
pub(crate) fn is_py_space(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\u{1c}'..='\u{1f}')
}

/// Splits `text` into the pieces Meta's `Tokenizer.encode` hands to tiktoken:
/// windows of [`MAX_ENCODE_CHARS`] code points, each cut so that no piece holds
/// more than [`MAX_RUN_CHARS`] consecutive whitespace or non-whitespace characters.
pub(crate) fn for_each_chunk(text: &str, mut f: impl FnMut(&str)) {
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest
            .char_indices()
            .nth(MAX_ENCODE_CHARS)
            .map_or(rest.len(), |(i, _)| i);
        let (window, tail) = rest.split_at(end);
        split_runs(window, MAX_RUN_CHARS, &mut f);
        rest = tail;
    }
}

/// Meta's `_split_whitespaces_or_nonwhitespaces`.
fn split_runs(s: &str, max_run: usize, f: &mut impl FnMut(&str)) {
    let Some(first) = s.chars().next() else {
        return;
    };
    let mut run_is_space = is_py_space(first);
    let mut run_len = 0usize;
    let mut start = 0usize;
    for (i, c) in s.char_indices() {
        let space = is_py_space(c);
        if space != run_is_space {
            run_is_space = space;
            run_len = 1;
        } else {
            run_len += 1;
            if run_len > max_run {
                f(&s[start..i]);
                start = i;
                run_len = 1;
            }
        }
    }
    f(&s[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(s: &str, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        split_runs(s, max, &mut |p| out.push(p.to_string()));
        out
    }

    #[test]
    fn split_runs_matches_meta() {
        // Expected values from Meta's _split_whitespaces_or_nonwhitespaces(s, 3).
        assert_eq!(chunks("abcdef", 3), ["abc", "def"]);
        assert_eq!(chunks("ab  cd", 3), ["ab  cd"]);
        assert_eq!(chunks("a     b", 3), ["a   ", "  b"]);
        assert_eq!(chunks("", 3), Vec::<String>::new());
        assert_eq!(
            chunks("\u{1c}\u{1c}\u{1c}\u{1c}x", 3),
            ["\u{1c}\u{1c}\u{1c}", "\u{1c}x"]
        );
        assert_eq!(chunks("äöüß", 3), ["äöü", "ß"]);
    }

    #[test]
    fn alphabet_is_gpt2() {
        let t = byte_level_alphabet();
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        let distinct: HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn meta_specials_numbering() {
        let s = meta_special_tokens(128_000);
        assert_eq!(s.len(), 256);
        assert_eq!(s[0], ("<|begin_of_text|>".to_string(), 128_000));
        assert_eq!(s[9], ("<|eot_id|>".to_string(), 128_009));
        assert_eq!(s[12], ("<|reserved_special_token_2|>".to_string(), 128_012));
        assert_eq!(
            s[255],
            ("<|reserved_special_token_245|>".to_string(), 128_255)
        );
    }
}
