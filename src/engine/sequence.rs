//! One request's state inside the engine.

use super::constraint::SeqMatcher;
use super::kv_blocks::BlockKey;
use super::request::{FinishReason, SamplingParams, TokenLogprob};
use crate::tokenizer::StreamDecoder;

pub struct Sequence {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub seed: u64,
    pub generated: Vec<u32>,
    /// Tokens (prompt then generated) whose K/V are in the cache.
    pub computed: usize,
    pub block_table: Vec<u32>,
    /// Chained hashes of the full blocks of the tokens so far (prefix caching).
    pub block_hashes: Vec<u64>,
    /// Identities of the registered (findable) blocks of `block_table`, from the first on.
    pub block_keys: Vec<BlockKey>,
    /// Prompt tokens served from the prefix cache when the request was first admitted.
    pub cached_prompt: Option<usize>,
    /// Longest this sequence may grow (prompt + generated), from the context length.
    pub max_len: usize,
    pub logprobs: Vec<TokenLogprob>,
    pub prompt_logprobs: Vec<Option<f32>>,
    pub decoder: StreamDecoder,
    /// Decoded text so far (cut at a stop string once one appears).
    pub text: String,
    /// Bytes of `text` already reported.
    pub emitted: usize,
    pub finish: Option<FinishReason>,
    /// Structured output: this sequence's matcher (each sample its own).
    pub constraint: Option<SeqMatcher>,
}

impl Sequence {
    pub fn total_len(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }

    pub fn token_at(&self, i: usize) -> u32 {
        if i < self.prompt.len() {
            self.prompt[i]
        } else {
            self.generated[i - self.prompt.len()]
        }
    }

    /// Tokens `from..to` (prompt then generated).
    pub fn tokens(&self, from: usize, to: usize) -> Vec<u32> {
        (from..to).map(|i| self.token_at(i)).collect()
    }

    /// Tokens still to run through the model before the next sample.
    pub fn pending(&self) -> usize {
        self.total_len() - self.computed
    }

    /// True while prompt log-probs are still owed for prompt positions.
    pub fn wants_prompt_logprobs(&self) -> bool {
        self.params.prompt_logprobs && self.prompt_logprobs.len() < self.prompt.len()
    }
}

/// Where generated text may be cut by a stop string: everything before the returned byte offset is
/// safe to report; the rest could still grow into a stop string.
pub fn safe_prefix(text: &str, stop: &[String]) -> usize {
    let hold = stop
        .iter()
        .map(|s| s.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let mut end = text.len().saturating_sub(hold);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// Byte offset of the first stop string in `text`, searching from `from` (bytes) back by the
/// longest stop string so matches that straddle the old end are found.
pub fn find_stop(text: &str, stop: &[String], from: usize) -> Option<usize> {
    let longest = stop.iter().map(String::len).max().unwrap_or(0);
    let mut start = from.saturating_sub(longest);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    stop.iter()
        .filter_map(|s| text[start..].find(s.as_str()).map(|i| start + i))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_across_pushes_and_held_back() {
        let stop = vec!["END".to_string()];
        assert_eq!(find_stop("abcEN", &stop, 3), None);
        assert_eq!(find_stop("abcENDx", &stop, 5), Some(3));
        assert_eq!(safe_prefix("abcEN", &stop), 3);
        assert_eq!(safe_prefix("ab", &[]), 2);
        // Never inside a multi-byte character.
        assert_eq!(safe_prefix("aé", &["xy".into()]), 1);
    }
}
