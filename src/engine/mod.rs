//! Engine: continuous batching over a paged KV block pool.
//!
//! Each [`Engine::step`] schedules work (decode tokens of running sequences first, then prefill
//! chunks, then newly admitted requests while blocks and the token budget allow), runs one packed
//! forward, samples, applies stop rules and frees finished sequences' blocks. When blocks run out
//! the newest sequence is preempted (its blocks freed, recomputed later), never an error.
//! With prefix caching (on by default) a request admitted takes the longest cached run of full
//! blocks of its tokens from the pool ([`kv_blocks`]) and computes only the rest; the blocks a
//! step completes become findable after it. Positions past those blocks that a running sequence
//! with the same tokens has computed (n samples of a prompt) are copied from its block on write. A result never depends on where its K/V came from.
//! The engine knows requests and tokens, never files, sockets or terminals.

pub mod constraint;
pub mod kv_blocks;
pub mod request;
pub mod sampler;
pub mod sequence;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use constraint::{Grammars, Mask, SeqMatcher};
use kv_blocks::BlockPool;
pub use request::{Event, FinishReason, RequestOutput, SamplingParams, TokenLogprob};
use sequence::{find_stop, safe_prefix, Sequence};

use crate::model::{
    ModelError, ModelRunner, RowMasks, RowSampling, Sampled, SeqSpan, StepInput, StepOutput,
};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Batching limits.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences running at once.
    pub max_batch_size: usize,
    /// Most tokens (decode + prefill) in one forward.
    pub max_batch_tokens: usize,
    /// Most prompt tokens of one sequence in one forward (chunked prefill).
    pub prefill_chunk: usize,
    /// Automatic prefix caching: full KV blocks are kept findable and shared between requests
    /// with the same prefix (results are the same either way; only the work differs).
    pub prefix_cache: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_size: 64,
            max_batch_tokens: 1024,
            prefill_chunk: 512,
            prefix_cache: true,
        }
    }
}

/// A request the engine refuses before it runs.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A constraint that does not compile; the message starts with the field that gave it.
    #[error("{0}")]
    Constraint(String),
    #[error("prompt has {prompt} tokens but at most {limit} fit ({why}); shorten it")]
    TooLong {
        prompt: usize,
        limit: usize,
        why: String,
    },
}

/// Counters since the engine started.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub steps: u64,
    /// Prompt tokens computed (recomputation after preemption included).
    pub prefill_tokens: u64,
    /// Prompt tokens served from the prefix cache instead of computed (copied ones included).
    pub cached_prompt_tokens: u64,
    /// KV blocks copied on write (a partial block another sequence had computed).
    pub copied_blocks: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    pub forward_seconds: f64,
    /// Structured outputs: masks computed, and their summed compute time (all threads).
    pub masks: u64,
    pub mask_seconds: f64,
}

/// KV blocks to copy `(src, dst)` before a step's forward.
type KvCopies = Vec<(u32, u32)>;

enum RowUse {
    PromptLogprob { seq: u64, index: usize },
    Sample { seq: u64 },
}

pub struct Engine {
    model: Box<dyn ModelRunner>,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
    pool: BlockPool,
    seqs: HashMap<u64, Sequence>,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    stop_ids: Vec<u32>,
    next_id: u64,
    stats: EngineStats,
    /// Structured outputs: token trie and grammar factory, built on the first constraint.
    grammars: Arc<Grammars>,
}

impl EngineStats {
    /// Share of prompt tokens served from the prefix cache (0 when there were none).
    pub fn prefix_hit_rate(&self) -> f64 {
        let all = self.cached_prompt_tokens + self.prefill_tokens;
        if all == 0 {
            0.0
        } else {
            self.cached_prompt_tokens as f64 / all as f64
        }
    }
}

impl Engine {
    pub fn new(model: Box<dyn ModelRunner>, tokenizer: Arc<Tokenizer>, cfg: EngineConfig) -> Self {
        let kv = model.kv_shape();
        // Block hashes start from what else decides a block's contents: the model, this rank's
        // slice of it, the backend and its KV dtype. One pool serves one model, so this guards
        // against a future shared pool more than today's.
        let salt = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            format!("{:?} {:?} {}", model.config(), kv, model.backend_name()).hash(&mut h);
            h.finish()
        };
        let pool = BlockPool::with_salt(kv.num_blocks, kv.block_size, salt);
        let stop_ids = tokenizer.stop_ids();
        let grammars = Arc::new(Grammars::new(
            Arc::clone(&tokenizer),
            model.config().vocab_size,
        ));
        Engine {
            model,
            tokenizer,
            cfg,
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stop_ids,
            next_id: 0,
            stats: EngineStats::default(),
            grammars,
        }
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }
    pub fn model(&self) -> &dyn ModelRunner {
        self.model.as_ref()
    }
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    /// Structured outputs: compile a constraint against this model's vocabulary.
    pub fn grammars(&self) -> &Arc<Grammars> {
        &self.grammars
    }
    /// KV positions per block (the prefix cache's unit).
    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }
    /// The KV block pool (its counts: free, cached, total).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Longest sequence (prompt + generated) one request can reach.
    pub fn max_len(&self) -> usize {
        self.model
            .config()
            .max_seq_len
            .min(self.pool.total() * self.pool.block_size())
    }

    /// Queue a request; its id comes back in every event about it.
    pub fn add_request(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<u64, RequestError> {
        params.validate().map_err(RequestError::Invalid)?;
        if prompt.is_empty() {
            return Err(RequestError::Invalid("the prompt is empty".into()));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(t) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(RequestError::Invalid(format!(
                "prompt token id {t} is outside the vocabulary (size {vocab})"
            )));
        }
        let max_len = self.max_len();
        if prompt.len() >= max_len {
            let ctx = self.model.config().max_seq_len;
            let why = if max_len < ctx {
                format!(
                    "the KV cache holds {max_len} tokens, the model's context {ctx}; raise --kv-cache-gb"
                )
            } else {
                format!("the context length is {ctx}, one token is left to generate")
            };
            return Err(RequestError::TooLong {
                prompt: prompt.len(),
                limit: max_len - 1,
                why,
            });
        }
        let constraint = match &params.constraint {
            Some(spec) => Some(
                self.grammars
                    .compile(spec)
                    .map_err(RequestError::Constraint)?,
            ),
            None => None,
        };
        let id = self.next_id;
        self.next_id += 1;
        let seed = params.seed.unwrap_or_else(|| sampler::random_seed(id));
        let prompt_logprobs = if params.prompt_logprobs {
            vec![None]
        } else {
            Vec::new()
        };
        let decoder = StreamDecoder::skipping_special(params.skip_special_tokens);
        let mut block_hashes = Vec::new();
        if self.cfg.prefix_cache {
            self.pool.extend_hashes(&mut block_hashes, &prompt);
        }
        self.seqs.insert(
            id,
            Sequence {
                id,
                prompt,
                params,
                seed,
                generated: Vec::new(),
                computed: 0,
                block_table: Vec::new(),
                block_hashes,
                block_keys: Vec::new(),
                cached_prompt: None,
                max_len,
                logprobs: Vec::new(),
                prompt_logprobs,
                decoder,
                text: String::new(),
                emitted: 0,
                finish: None,
                constraint,
            },
        );
        self.waiting.push_back(id);
        Ok(id)
    }

    /// Queue `n` samples of one prompt: sample `i` is the request with seed `seed + i` (a seed
    /// is drawn when none is given). Their ids, in sample order. The samples share the prompt's
    /// KV: the first computes it, the others wait for its full blocks (one step), take them from
    /// the prefix cache and a copy of its last, partial block (copy on write), and compute only
    /// the last prompt token (its logits are needed).
    pub fn add_request_n(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
        n: usize,
    ) -> Result<Vec<u64>, RequestError> {
        if n == 0 {
            return Err(RequestError::Invalid("n must be at least 1".into()));
        }
        let base = params
            .seed
            .unwrap_or_else(|| sampler::random_seed(self.next_id));
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let p = SamplingParams {
                seed: Some(base.wrapping_add(i as u64)),
                ..params.clone()
            };
            match self.add_request(prompt.clone(), p) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        self.abort(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(ids)
    }

    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Stop a request now; its output so far comes back with finish reason `abort`.
    pub fn abort(&mut self, id: u64) -> Option<RequestOutput> {
        let mut seq = self.seqs.remove(&id)?;
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&r| r != id);
        self.pool.release(&mut seq.block_table);
        seq.finish = Some(FinishReason::Abort);
        Some(Self::output(seq))
    }

    fn preempt(&mut self, id: u64) {
        self.running.retain(|&r| r != id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            // Its registered blocks stay findable: the resumed request hits what is still cached.
            self.pool.release(&mut seq.block_table);
            seq.block_keys.clear();
            seq.computed = 0;
        }
        self.waiting.push_front(id);
        self.stats.preemptions += 1;
        tracing::debug!(seq = id, "preempted: KV blocks exhausted, will recompute");
    }

    /// Decide this step's work: (sequence, tokens to run) pairs, and the KV blocks to copy
    /// `(src, dst)` before the forward.
    fn schedule(&mut self) -> (Vec<(u64, usize)>, KvCopies) {
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let mut plan: Vec<(u64, usize)> = Vec::new();
        let mut planned: HashSet<u64> = HashSet::new();
        // Decodes first (one token each, they keep latency low), then prefill continuations.
        for decode_pass in [true, false] {
            let mut i = 0;
            while i < self.running.len() {
                let id = self.running[i];
                let pending = self.seqs[&id].pending();
                if planned.contains(&id) || (pending == 1) != decode_pass || budget == 0 {
                    i += 1;
                    continue;
                }
                let n = pending.min(self.cfg.prefill_chunk.max(1)).min(budget);
                loop {
                    let seq = self.seqs.get_mut(&id).expect("running sequence exists");
                    let need = seq.computed + n;
                    if self.pool.ensure(&mut seq.block_table, need) {
                        plan.push((id, n));
                        planned.insert(id);
                        budget -= n;
                        i += 1;
                        break;
                    }
                    // Out of blocks: free the newest sequence that is not already in this step.
                    let victim = self
                        .running
                        .iter()
                        .rev()
                        .copied()
                        .find(|v| !planned.contains(v))
                        .expect("the current sequence is unplanned");
                    self.preempt(victim);
                    if victim == id {
                        break;
                    }
                }
            }
        }
        // Hashes of full blocks running sequences are computing now: a waiting request whose
        // next block is one of them waits a step for it to become findable, rather than
        // computing it again beside it (n samples of a prompt, records sharing a system prompt).
        let mut inflight: HashSet<u64> = HashSet::new();
        if self.cfg.prefix_cache {
            for id in &self.running {
                let s = &self.seqs[id];
                inflight.extend(&s.block_hashes[s.block_keys.len().min(s.block_hashes.len())..]);
            }
        }
        // Sequences whose computed K/V a newly admitted one may copy: those running before
        // admission (what one admitted now holds is written only by this step's forward).
        let sources = self.running.clone();
        let mut copies = Vec::new();
        // Admit waiting requests in arrival order while there is room.
        let mut at = 0;
        while self.running.len() < self.cfg.max_batch_size.max(1)
            && budget > 0
            && at < self.waiting.len()
        {
            let id = self.waiting[at];
            let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
            let mut hit = 0;
            let may_serve = !seq.wants_prompt_logprobs();
            if self.cfg.prefix_cache {
                // The last token is always computed (its logits are needed), so at most the
                // blocks before it; prompt log-probs owed are computed, never served.
                let max_blocks = if seq.wants_prompt_logprobs() {
                    0
                } else {
                    (seq.total_len() - 1) / self.pool.block_size()
                };
                let tokens = seq.tokens(0, seq.total_len());
                seq.block_keys = self.pool.take_cached_prefix(
                    &tokens,
                    &seq.block_hashes,
                    max_blocks,
                    &mut seq.block_table,
                );
                hit = seq.block_keys.len() * self.pool.block_size();
                seq.computed = hit;
                let next = seq.block_keys.len();
                if next < max_blocks.min(seq.block_hashes.len())
                    && inflight.contains(&seq.block_hashes[next])
                {
                    self.pool.release(&mut seq.block_table);
                    seq.block_keys.clear();
                    seq.computed = 0;
                    at += 1;
                    continue;
                }
            }
            // Copy on write: positions after the cached prefix that a running sequence with the
            // same tokens has computed (n samples of a prompt) are copied from its block, not
            // computed again; the last token still is (its logits are needed).
            let copy = if self.cfg.prefix_cache && may_serve {
                self.copy_source(id, &sources)
            } else {
                None
            };
            let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
            if let Some((_, end)) = copy {
                seq.computed = end;
                hit = end;
            }
            let n = seq.pending().min(self.cfg.prefill_chunk.max(1)).min(budget);
            if !self.pool.ensure(&mut seq.block_table, seq.computed + n) {
                self.pool.release(&mut seq.block_table);
                seq.block_keys.clear();
                seq.computed = 0;
                break;
            }
            if let Some((src, _)) = copy {
                copies.push((src, seq.block_table[seq.block_keys.len()]));
                self.stats.copied_blocks += 1;
            }
            let cached = hit.min(seq.prompt.len());
            seq.cached_prompt.get_or_insert(cached);
            self.stats.cached_prompt_tokens += cached as u64;
            inflight.extend(&seq.block_hashes[seq.block_keys.len()..]);
            self.waiting.remove(at);
            self.running.push(id);
            plan.push((id, n));
            budget -= n;
        }
        (plan, copies)
    }

    /// For a sequence being admitted with its cached prefix taken: a running sequence (of
    /// `sources`) that has computed the same tokens past that prefix, within its next block and
    /// before its last token. The block to copy and the end of the positions it serves.
    fn copy_source(&self, id: u64, sources: &[u64]) -> Option<(u32, usize)> {
        let seq = self.seqs.get(&id)?;
        let bs = self.pool.block_size();
        let k = seq.block_keys.len();
        let from = seq.computed;
        let end = (seq.total_len() - 1).min((k + 1) * bs);
        if from != k * bs || end <= from {
            return None;
        }
        let mut best: Option<(u32, usize)> = None;
        for o in sources.iter().filter(|&&o| o != id) {
            let Some(o) = self.seqs.get(o) else {
                continue;
            };
            // The same registered prefix (so the same tokens before `from`), then the same
            // tokens for as far as the other sequence has computed.
            if o.block_keys.get(..k) != Some(&seq.block_keys[..]) || o.block_table.len() <= k {
                continue;
            }
            let upto = end.min(o.computed);
            let same = (from..upto)
                .take_while(|&i| o.token_at(i) == seq.token_at(i))
                .count();
            if same > 0 && best.is_none_or(|(_, e)| from + same > e) {
                best = Some((o.block_table[k], from + same));
                if from + same == end {
                    break;
                }
            }
        }
        best
    }

    /// After a step: make the sequence's newly completed blocks findable (from the next step on:
    /// nothing scheduled in the step that wrote them could read them).
    fn register_full_blocks(&mut self, id: u64) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let bs = self.pool.block_size();
        let full = seq.computed / bs;
        while seq.block_hashes.len() < full {
            let k = seq.block_hashes.len();
            let h = self.pool.block_hash(
                seq.block_hashes.last().copied(),
                &seq.tokens(k * bs, (k + 1) * bs),
            );
            seq.block_hashes.push(h);
        }
        for k in seq.block_keys.len()..full {
            let key = self.pool.register(
                seq.block_table[k],
                seq.block_hashes[k],
                seq.block_keys.last().copied(),
                &seq.tokens(k * bs, (k + 1) * bs),
            );
            seq.block_keys.push(key);
        }
    }

    /// Run one forward over everything scheduled and report what happened.
    pub fn step(&mut self) -> Result<Vec<Event>, ModelError> {
        let (plan, kv_copies) = self.schedule();
        if plan.is_empty() {
            if self.has_unfinished() {
                // add_request caps every sequence at the pool size, so this is a bug, not a user error.
                return Err(ModelError::Input(format!(
                    "scheduler made no progress with {} waiting requests and {} free KV blocks",
                    self.waiting.len(),
                    self.pool.available()
                )));
            }
            return Ok(Vec::new());
        }
        let (input, uses) = self.step_input(&plan, kv_copies);
        // Structured outputs: each constrained row's mask depends only on tokens already chosen,
        // so the masks are computed on another thread while the forward runs.
        let mut matchers: Vec<(usize, u64, SeqMatcher)> = uses
            .iter()
            .enumerate()
            .filter_map(|(r, u)| match u {
                RowUse::Sample { seq } => self
                    .seqs
                    .get_mut(seq)
                    .and_then(|s| s.constraint.take())
                    .map(|m| (r, *seq, m)),
                RowUse::PromptLogprob { .. } => None,
            })
            .collect();
        // A device that samples takes the masks after it has started the forward (they go up
        // in one more copy and its sampling kernel applies them): the model calls back for them
        // once the forward is queued. A mask in error or empty stops its request below (the
        // row's token, sampled without it, is dropped).
        let on_device = !matchers.is_empty()
            && uses.iter().all(|u| matches!(u, RowUse::Sample { .. }))
            && self.model.samples_on_device();
        let (logits, sampled, masks) = if on_device {
            let mut computed = None;
            let n_rows = uses.len();
            let mut masks_now = || {
                let (masks, secs) = compute_masks(&mut matchers);
                let mut words: RowMasks = vec![None; n_rows];
                for ((r, _, _), m) in matchers.iter().zip(&masks) {
                    match m {
                        Ok(m) if !m.is_empty() => words[*r] = Some(m.words().to_vec()),
                        _ => {}
                    }
                }
                tracing::trace!(rows = words.len(), "masks computed");
                computed = Some((masks, secs));
                words
            };
            let (l, smp) = self.forward_masked(&input, &uses, &mut masks_now)?;
            let masks = computed.ok_or_else(|| {
                ModelError::Backend("the model sampled a constrained step without its masks".into())
            })?;
            (l, smp, Some(masks))
        } else {
            std::thread::scope(|scope| {
                let masking =
                    (!matchers.is_empty()).then(|| scope.spawn(|| compute_masks(&mut matchers)));
                let fwd = self.forward_step(&input, &uses, masking.is_some());
                let masks =
                    masking.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                fwd.map(|(l, s)| (l, s, masks))
            })?
        };
        let mut row_masks: Vec<Option<Result<Mask, String>>> = vec![None; uses.len()];
        if let Some((masks, secs)) = masks {
            self.stats.masks += masks.len() as u64;
            self.stats.mask_seconds += secs;
            for ((r, id, m), mask) in matchers.into_iter().zip(masks) {
                if let Some(s) = self.seqs.get_mut(&id) {
                    s.constraint = Some(m);
                }
                row_masks[r] = Some(mask);
            }
        }
        let vocab = self.model.config().vocab_size;
        for &(id, n) in &plan {
            if let Some(seq) = self.seqs.get_mut(&id) {
                if seq.computed < seq.prompt.len() {
                    self.stats.prefill_tokens += n.min(seq.prompt.len() - seq.computed) as u64;
                }
                seq.computed += n;
            }
            if self.cfg.prefix_cache {
                self.register_full_blocks(id);
            }
        }
        let mut events = self.stop_failed_masks(&uses, &mut row_masks);
        if let Some(sampled) = sampled {
            for (u, smp) in uses.into_iter().zip(sampled) {
                if let RowUse::Sample { seq } = u {
                    if let Some(ev) = self.accept_sampled(seq, smp) {
                        events.extend(ev);
                    }
                    events.extend(self.accept_forced(seq));
                }
            }
            return Ok(events);
        }
        let mut picks = self.host_picks(&uses, &logits, &row_masks);
        for (r, u) in uses.into_iter().enumerate() {
            let row = &logits[r * vocab..(r + 1) * vocab];
            match u {
                RowUse::PromptLogprob { seq, index } => {
                    let Some(s) = self.seqs.get_mut(&seq) else {
                        continue;
                    };
                    if s.prompt_logprobs.len() == index {
                        let norm = sampler::log_normalizer(row);
                        s.prompt_logprobs
                            .push(Some((row[s.prompt[index] as usize] as f64 - norm) as f32));
                    }
                }
                RowUse::Sample { seq } => {
                    if let Some((tok, lp)) = picks[r].take() {
                        if let Some(ev) = self.accept(seq, tok, lp) {
                            events.extend(ev);
                        }
                        events.extend(self.accept_forced(seq));
                    }
                }
            }
        }
        Ok(events)
    }

    /// The forward's input for `plan` (sequence, tokens to run) and what each logit row is for.
    fn step_input(&self, plan: &[(u64, usize)], kv_copies: KvCopies) -> (StepInput, Vec<RowUse>) {
        let mut input = StepInput {
            kv_copies,
            ..StepInput::default()
        };
        let mut uses = Vec::new();
        for &(id, n) in plan {
            let seq = &self.seqs[&id];
            let start = input.tokens.len();
            for j in 0..n {
                let pos = seq.computed + j;
                input.tokens.push(seq.token_at(pos));
                if seq.wants_prompt_logprobs()
                    && pos + 1 < seq.prompt.len()
                    && pos + 1 >= seq.prompt_logprobs.len()
                {
                    input.logit_rows.push(start + j);
                    uses.push(RowUse::PromptLogprob {
                        seq: id,
                        index: pos + 1,
                    });
                }
            }
            if seq.computed + n == seq.total_len() {
                input.logit_rows.push(start + n - 1);
                uses.push(RowUse::Sample { seq: id });
            }
            input.seqs.push(SeqSpan {
                token_start: start,
                n_tokens: n,
                context_len: seq.computed + n,
                block_table: seq.block_table.clone(),
            });
        }
        (input, uses)
    }

    /// A mask that cannot be computed (a grammar past its limits) or allows nothing stops its
    /// request; the row's mask is dropped.
    fn stop_failed_masks(
        &mut self,
        uses: &[RowUse],
        row_masks: &mut [Option<Result<Mask, String>>],
    ) -> Vec<Event> {
        let mut events = Vec::new();
        for (r, m) in row_masks.iter_mut().enumerate() {
            let why = match m {
                Some(Err(e)) => e.clone(),
                Some(Ok(mask)) if mask.is_empty() => "no token is allowed".to_string(),
                _ => continue,
            };
            *m = None;
            if let RowUse::Sample { seq } = uses[r] {
                tracing::warn!(
                    request = seq,
                    "structured output failed: {why}; the request stops (finish_reason abort)"
                );
                if let Some(out) = self.abort(seq) {
                    events.push(Event::Finished(out));
                }
            }
        }
        events
    }

    /// Host sampling of every row at once, on all cores: each pick is a pure function of its
    /// row, mask, parameters, seed and token index, so sharing out the work changes no result.
    fn host_picks(
        &self,
        uses: &[RowUse],
        logits: &[f32],
        row_masks: &[Option<Result<Mask, String>>],
    ) -> Vec<Option<(u32, Option<TokenLogprob>)>> {
        use rayon::prelude::*;
        let vocab = self.model.config().vocab_size;
        let seqs = &self.seqs;
        uses.par_iter()
            .enumerate()
            .map(|(r, u)| match u {
                RowUse::Sample { seq } => seqs.get(seq).map(|s| {
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    let n = s.generated.len() as u64;
                    let tok = match &row_masks[r] {
                        Some(Ok(mask)) => {
                            sampler::sample_masked(row, &mask.allowed(vocab), &s.params, s.seed, n)
                        }
                        _ => sampler::sample(row, &s.params, s.seed, n),
                    };
                    // Log-probs of the raw distribution, mask or not.
                    let lp = s
                        .params
                        .logprobs
                        .map(|n| sampler::token_logprob(row, tok, n));
                    (tok, lp)
                }),
                RowUse::PromptLogprob { .. } => None,
            })
            .collect()
    }

    /// The step's forward: through forward_sample when every row samples and none is
    /// constrained (a GPU backend samples where the logits are; the CPU backend hands the logits
    /// back), else host logits for the host sampler (constrained rows are masked there, on the
    /// CPU).
    fn forward_step(
        &mut self,
        input: &StepInput,
        uses: &[RowUse],
        constrained: bool,
    ) -> Result<(Vec<f32>, Option<Vec<Sampled>>), ModelError> {
        let t0 = Instant::now();
        let only_samples = uses.iter().all(|u| matches!(u, RowUse::Sample { .. }));
        let out = if only_samples && !constrained {
            let rows = self.row_sampling(uses);
            self.model.forward_sample(input, &rows)?
        } else {
            StepOutput::Logits(self.model.forward(input)?)
        };
        Ok(self.forward_done(t0, out))
    }

    /// A constrained step on a device that samples (every row samples): `masks` runs while
    /// the device computes the forward, then the rows are sampled with them.
    fn forward_masked(
        &mut self,
        input: &StepInput,
        uses: &[RowUse],
        masks: &mut dyn FnMut() -> RowMasks,
    ) -> Result<(Vec<f32>, Option<Vec<Sampled>>), ModelError> {
        let t0 = Instant::now();
        let rows = self.row_sampling(uses);
        let out = self.model.forward_sample_masked(input, &rows, masks)?;
        Ok(self.forward_done(t0, out))
    }

    /// The sampling parameters of a step whose rows all sample (no masks).
    fn row_sampling(&self, uses: &[RowUse]) -> Vec<RowSampling<'static>> {
        uses.iter()
            .filter_map(|u| match u {
                RowUse::Sample { seq } => self.seqs.get(seq).map(|s| RowSampling {
                    temperature: s.params.temperature,
                    top_p: s.params.top_p,
                    top_k: s.params.top_k,
                    seed: s.seed,
                    n: s.generated.len() as u64,
                    top_logprobs: s.params.logprobs.unwrap_or(0),
                    mask: None,
                }),
                RowUse::PromptLogprob { .. } => None,
            })
            .collect()
    }

    /// Count a forward and split its output into host logits or sampled rows.
    fn forward_done(&mut self, t0: Instant, out: StepOutput) -> (Vec<f32>, Option<Vec<Sampled>>) {
        self.stats.forward_seconds += t0.elapsed().as_secs_f64();
        self.stats.steps += 1;
        match out {
            StepOutput::Logits(l) => (l, None),
            StepOutput::Sampled(s) => (Vec::new(), Some(s)),
        }
    }

    /// Structured outputs: tokens the constraint forces next (a JSON schema's keys and
    /// punctuation) are appended without a forward or a sample each; the next step runs them as
    /// one chunk. Not with log-probs, which a forced token would have none of.
    fn accept_forced(&mut self, id: u64) -> Vec<Event> {
        let mut events = Vec::new();
        // Until the sequence finishes (it leaves `seqs`) or nothing is forced.
        while let Some(seq) = self.seqs.get_mut(&id) {
            if seq.params.logprobs.is_some() {
                break;
            }
            let forced = match seq.constraint.as_mut() {
                Some(m) => m.forced(),
                None => break,
            };
            if forced.is_empty() {
                break;
            }
            for tok in forced {
                match self.accept(id, tok, None) {
                    Some(ev) => events.extend(ev),
                    None => return events,
                }
                if !self.seqs.contains_key(&id) {
                    return events;
                }
            }
        }
        events
    }

    /// A token sampled on the device: same bookkeeping as a host-sampled one.
    fn accept_sampled(&mut self, id: u64, s: Sampled) -> Option<Vec<Event>> {
        let wants = self.seqs.get(&id)?.params.logprobs.is_some();
        let lp = wants.then_some(TokenLogprob {
            token_id: s.token,
            logprob: s.logprob,
            top: s.top,
        });
        self.accept(id, s.token, lp)
    }

    /// Append a chosen token and apply the stop rules.
    fn accept(&mut self, id: u64, tok: u32, lp: Option<TokenLogprob>) -> Option<Vec<Event>> {
        let seq = self.seqs.get_mut(&id)?;
        if let Some(lp) = lp {
            seq.logprobs.push(lp);
        }
        seq.generated.push(tok);
        self.stats.generated_tokens += 1;
        // Structured output: complete means end of turn (forced: only stop tokens are allowed).
        let mut constraint_done = false;
        if let Some(m) = seq.constraint.as_mut() {
            match m.consume(tok) {
                Ok(()) => constraint_done = m.is_done(),
                Err(e) => {
                    tracing::warn!(
                        request = id,
                        "structured output failed: {e}; the request stops (finish_reason abort)"
                    );
                    seq.finish = Some(FinishReason::Abort);
                }
            }
        }
        let is_stop_token = (!seq.params.ignore_eos && self.stop_ids.contains(&tok))
            || seq.params.stop_token_ids.contains(&tok)
            || (constraint_done && self.stop_ids.contains(&tok));
        let mut cut = false;
        if is_stop_token {
            seq.finish = Some(FinishReason::Stop);
        } else {
            let before = seq.text.len();
            seq.text.push_str(&seq.decoder.push(&self.tokenizer, tok));
            if !seq.params.stop.is_empty() {
                if let Some(at) = find_stop(&seq.text, &seq.params.stop, before) {
                    seq.text.truncate(at);
                    seq.finish = Some(FinishReason::Stop);
                    cut = true;
                }
            }
        }
        if constraint_done && seq.finish.is_none() {
            seq.finish = Some(FinishReason::Stop);
        }
        if seq.finish.is_none()
            && (seq.generated.len() >= seq.params.max_tokens || seq.total_len() >= seq.max_len)
        {
            seq.finish = Some(FinishReason::Length);
        }
        let end = if seq.finish.is_some() {
            if !cut {
                let rest = seq.decoder.finish();
                seq.text.push_str(&rest);
            }
            seq.text.len()
        } else {
            safe_prefix(&seq.text, &seq.params.stop).max(seq.emitted)
        };
        let text = seq.text[seq.emitted..end].to_string();
        seq.emitted = end;
        let mut events = vec![Event::Token {
            id,
            token: tok,
            text,
        }];
        if seq.finish.is_some() {
            let mut seq = self.seqs.remove(&id)?;
            self.running.retain(|&r| r != id);
            self.pool.release(&mut seq.block_table);
            events.push(Event::Finished(Self::output(seq)));
        }
        Some(events)
    }

    fn output(seq: Sequence) -> RequestOutput {
        RequestOutput {
            id: seq.id,
            prompt_tokens: seq.prompt.len(),
            cached_tokens: seq.cached_prompt.unwrap_or(0),
            token_ids: seq.generated,
            text: seq.text,
            finish_reason: seq.finish.unwrap_or(FinishReason::Abort),
            logprobs: seq.params.logprobs.map(|_| seq.logprobs),
            prompt_logprobs: seq.params.prompt_logprobs.then_some(seq.prompt_logprobs),
        }
    }

    /// Run until every queued request finishes; outputs in completion order.
    pub fn run_to_completion(&mut self) -> Result<Vec<RequestOutput>, ModelError> {
        let mut done = Vec::new();
        while self.has_unfinished() {
            for ev in self.step()? {
                if let Event::Finished(out) = ev {
                    done.push(out);
                }
            }
        }
        Ok(done)
    }
}

/// Each constrained row's mask, in parallel across rows; and their summed compute time.
fn compute_masks(matchers: &mut [(usize, u64, SeqMatcher)]) -> (Vec<Result<Mask, String>>, f64) {
    use rayon::prelude::*;
    let timed: Vec<(Result<Mask, String>, f64)> = matchers
        .par_iter_mut()
        .map(|(_, _, m)| {
            let t0 = Instant::now();
            let mask = m.mask();
            (mask, t0.elapsed().as_secs_f64())
        })
        .collect();
    let secs = timed.iter().map(|t| t.1).sum();
    (timed.into_iter().map(|t| t.0).collect(), secs)
}
