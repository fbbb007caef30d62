//! Structured outputs: a per-sequence matcher beside the sampler (JSON schema, JSON object,
//! regex, choice, Lark grammar), on llguidance.
//!
//! [`Grammars`] is built once per model: the token trie from the tokenizer's token bytes (special
//! tokens as byte 0xFF + their name, as llguidance documents) and llguidance's parser factory. It
//! is built on the first constrained request (about half a second for a 128k vocabulary), so runs
//! without constraints pay nothing. Each request's [`ConstraintSpec`] compiles to a [`SeqMatcher`]
//! that yields the mask of allowed tokens for the next step and consumes the sampled token.
//!
//! JSON whitespace is bounded by default: one space after `,` and `:`, no other whitespace (a
//! random or weak model otherwise emits whitespace until max_tokens). A schema's own `x-guidance`
//! options, or a whitespace pattern the request gives, replace that default.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::tokenizer::Tokenizer;

/// What a request constrains its output to, as it asked (before compiling).
#[derive(Clone, Debug, PartialEq)]
pub struct ConstraintSpec {
    /// Where the constraint came from (`response_format`, `guided_regex`, `--json-schema`): every
    /// error about it starts with this.
    pub field: String,
    pub kind: ConstraintKind,
    /// JSON only: a regex for the whitespace allowed between tokens (vLLM's
    /// `guided_whitespace_pattern`); `None` keeps the bounded default.
    pub whitespace_pattern: Option<String>,
    /// JSON only: allow any whitespace (llguidance's own default; unbounded).
    pub whitespace_flexible: bool,
}

/// The kinds of constraint.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstraintKind {
    /// A JSON schema (draft 2020-12 subset llguidance supports).
    JsonSchema(Value),
    /// Any JSON object.
    JsonObject,
    /// A regular expression the whole output must match (Rust regex syntax).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar, as llguidance reads it.
    Lark(String),
}

impl ConstraintSpec {
    pub fn new(field: impl Into<String>, kind: ConstraintKind) -> Self {
        ConstraintSpec {
            field: field.into(),
            kind,
            whitespace_pattern: None,
            whitespace_flexible: false,
        }
    }

    /// The llguidance grammar for this spec, or why there is none.
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        let json = |schema: Value| -> Result<TopLevelGrammar, String> {
            let mut schema = match schema {
                Value::Object(o) => o,
                Value::Bool(true) => serde_json::Map::new(),
                Value::Bool(false) => return Err("the schema `false` matches nothing".into()),
                other => {
                    return Err(format!(
                        "a JSON schema must be an object, got {}",
                        kind_of(&other)
                    ))
                }
            };
            if !schema.contains_key("x-guidance") {
                let opts = if let Some(p) = &self.whitespace_pattern {
                    json!({"whitespace_pattern": p})
                } else if self.whitespace_flexible {
                    json!({"whitespace_flexible": true})
                } else {
                    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
                };
                schema.insert("x-guidance".into(), opts);
            }
            Ok(TopLevelGrammar::from_json_schema(Value::Object(schema)))
        };
        match &self.kind {
            ConstraintKind::JsonSchema(s) => json(s.clone()),
            ConstraintKind::JsonObject => json(json!({"type": "object"})),
            ConstraintKind::Regex(r) => Ok(TopLevelGrammar::from_regex(r)),
            ConstraintKind::Choice(c) => {
                if c.is_empty() {
                    return Err("the list of choices is empty".into());
                }
                // A Lark alternation of string literals (JSON string escapes are Lark's).
                let alts: Vec<String> = c
                    .iter()
                    .map(|s| serde_json::to_string(s).unwrap_or_default())
                    .collect();
                Ok(TopLevelGrammar::from_lark(format!(
                    "start: {}",
                    alts.join(" | ")
                )))
            }
            ConstraintKind::Lark(g) => {
                if g.trim().is_empty() {
                    return Err("the grammar is empty".into());
                }
                Ok(TopLevelGrammar::from_lark(g.clone()))
            }
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The tokenizer as llguidance sees it: the trie over every id's bytes, and canonical BPE
/// tokenization (for tokens the grammar forces).
struct HerdTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for HerdTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text, false, false),
            // BPE over bytes that are not text: the trie's greedy split is a valid tokenization.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// The token bytes llguidance's trie wants, indexed by id up to the model's vocabulary: ordinary
/// tokens as their bytes, special tokens as 0xFF + name, ids the tokenizer lacks empty (never
/// allowed).
pub fn trie_words(tok: &Tokenizer, vocab_size: usize) -> Vec<Vec<u8>> {
    (0..vocab_size as u32)
        .map(|id| match tok.token_bytes(id) {
            Some(b) if tok.is_special(id) => {
                let mut w = Vec::with_capacity(b.len() + 1);
                w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                w.extend_from_slice(b);
                w
            }
            Some(b) => b.to_vec(),
            None => Vec::new(),
        })
        .collect()
}

/// The per-model part: token trie and parser factory, built on first use.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl Grammars {
    /// Cheap: nothing is built until the first [`Grammars::compile`].
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Self {
        Grammars {
            tokenizer,
            vocab_size,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>, String> {
        self.factory
            .get_or_init(|| {
                let t0 = std::time::Instant::now();
                let words = trie_words(&self.tokenizer, self.vocab_size);
                let stops: Vec<TokenId> = self
                    .tokenizer
                    .stop_ids()
                    .into_iter()
                    .filter(|&t| (t as usize) < self.vocab_size)
                    .collect();
                let Some(&eos) = stops.last() else {
                    return Err(
                        "the tokenizer has no end-of-turn token in the model's vocabulary".into(),
                    );
                };
                let mut info = TokRxInfo::new(self.vocab_size as u32, eos);
                info.tok_end_of_turn = Some(self.tokenizer.eot_id());
                info.tok_bos = Some(self.tokenizer.bos_id());
                // Every Llama 3 stop token ends a constrained output.
                let trie = TokTrie::from(&info, &words).with_eos_tokens(&stops);
                let env: TokEnv = Arc::new(HerdTokEnv {
                    trie,
                    tokenizer: Arc::clone(&self.tokenizer),
                });
                let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                f.quiet();
                // Errors go to users: what is wrong, without the parser's state dump.
                f.limits_mut().verbose_errors = false;
                tracing::debug!(
                    seconds = t0.elapsed().as_secs_f64(),
                    "structured outputs: token trie and grammar factory built"
                );
                Ok(Arc::new(f))
            })
            .as_ref()
            .map_err(|e| format!("structured outputs are unavailable: {e}"))
    }

    /// A fresh matcher for `spec`. The error starts with the spec's field name.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<SeqMatcher, String> {
        let fail = |e: String| format!("{}: {e}", spec.field);
        let grammar = spec.grammar().map_err(fail)?;
        let factory = self.factory().map_err(fail)?;
        let m = Matcher::new(factory.create_parser(grammar));
        if let Some(e) = m.get_error() {
            return Err(fail(one_line(&e)));
        }
        Ok(SeqMatcher {
            m,
            vocab_size: self.vocab_size,
        })
    }
}

/// An llguidance error on one line (a regex error points at the spot over several), capped.
fn one_line(e: &str) -> String {
    let one: Vec<&str> = e.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut one = one.join(" ");
    if one.len() > 400 {
        let mut end = 400;
        while !one.is_char_boundary(end) {
            end -= 1;
        }
        one.truncate(end);
        one.push_str(" ...");
    }
    one
}

/// One sequence's matcher.
pub struct SeqMatcher {
    m: Matcher,
    vocab_size: usize,
}

/// The tokens allowed at one step.
#[derive(Clone, Debug)]
pub struct Mask(SimpleVob);

impl Mask {
    /// Allowed ids in ascending order, below `len`.
    pub fn allowed(&self, len: usize) -> Vec<u32> {
        let mut ids = Vec::new();
        self.0.iter_set_entries(|i| {
            if i < len {
                ids.push(i as u32);
            }
        });
        ids
    }

    /// The mask as bits, one per token id (bit `j % 32` of word `j / 32`), as a device sampler
    /// reads it.
    pub fn words(&self) -> &[u32] {
        self.0.as_slice()
    }

    /// No token allowed (a matcher in error; llguidance otherwise always allows one).
    pub fn is_empty(&self) -> bool {
        self.0.is_zero()
    }

    pub fn is_allowed(&self, id: u32) -> bool {
        (id as usize) < self.0.len() && self.0.is_allowed(id)
    }
}

impl SeqMatcher {
    /// An independent copy in the same state (for `n` samples of one prompt).
    pub fn fork(&self) -> SeqMatcher {
        SeqMatcher {
            m: self.m.deep_clone(),
            vocab_size: self.vocab_size,
        }
    }

    /// The tokens allowed next (only the stop tokens once the constraint is complete).
    pub fn mask(&mut self) -> Result<Mask, String> {
        let v = self
            .m
            .compute_mask_or_eos()
            .map_err(|e| one_line(&e.to_string()))?;
        Ok(Mask(v))
    }

    /// Advance past a sampled token.
    pub fn consume(&mut self, tok: u32) -> Result<(), String> {
        self.m
            .consume_token(tok)
            .map_err(|e| one_line(&e.to_string()))
    }

    /// Tokens the constraint allows alone from here, in order (not consumed yet).
    pub fn forced(&mut self) -> Vec<u32> {
        self.m.compute_ff_tokens()
    }

    /// True once the constraint is complete: nothing but end-of-turn can follow.
    pub fn is_done(&self) -> bool {
        self.m.is_stopped()
    }
}
