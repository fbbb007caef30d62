//! What a caller asks for and what it gets back.

use std::sync::Arc;

use super::constraint::ConstraintSpec;

/// Per-request generation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Seed of this request's random stream; `None` draws one.
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// Generation stops when the text contains any of these; the text ends before it.
    pub stop: Vec<String>,
    /// Extra stop token ids (beside the model's end-of-turn tokens).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating through end-of-turn tokens (benchmarks).
    pub ignore_eos: bool,
    /// Report each generated token's log-prob and this many top alternatives.
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-prob.
    pub prompt_logprobs: bool,
    /// Leave special tokens (`<|reserved_special_token_163|>`) out of the text, as HF and vLLM
    /// do by default; token ids are reported either way.
    pub skip_special_tokens: bool,
    /// Structured output: the text must match this (JSON schema, regex, choice, grammar).
    pub constraint: Option<Arc<ConstraintSpec>>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: false,
            skip_special_tokens: true,
            constraint: None,
        }
    }
}

impl SamplingParams {
    /// A readable reason when the settings make no sense.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("stop strings must not be empty".into());
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// max_tokens or the context length.
    Length,
    /// Aborted by the caller.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// A generated token's log-prob under the model (before temperature), with the top alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The finished result of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutput {
    pub id: u64,
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V came from the prefix cache (not computed for this request).
    pub cached_tokens: usize,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// `None` first (the first prompt token has no context), then each prompt token's log-prob.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
}

/// What a step reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// New text of a request (may be empty while a stop string could still be forming).
    Token {
        id: u64,
        token: u32,
        text: String,
    },
    Finished(RequestOutput),
}
