//! `herd generate`: one completion, streamed to stdout (or one JSON record with --json).

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};

use super::record::result_record;
use super::setup::{start, ModelArgs};
use super::SamplingArgs;
use crate::engine::{Event, RequestOutput};
use crate::exit;
use crate::tokenizer::Message;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Raw text prompt (a begin-of-text token is added).
    #[arg(long, conflicts_with_all = ["messages", "prompt_token_ids"])]
    pub prompt: Option<String>,
    /// Chat messages as JSON: [{"role": "user", "content": "..."}] (Llama 3 chat format).
    #[arg(long, conflicts_with = "prompt_token_ids")]
    pub messages: Option<String>,
    /// Prompt as token ids: 128000,9906,11
    #[arg(long, value_delimiter = ',')]
    pub prompt_token_ids: Option<Vec<u32>>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub constraint: super::constraint_fields::ConstraintArgs,
    /// Print one result record (JSON) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Report each generated token's log-prob and the top N alternatives (with --json).
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-prob (with --json).
    #[arg(long)]
    pub prompt_logprobs: bool,
    /// Completions of the prompt (with --json: one record with `choices`); sample i uses seed + i.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
}

impl GenerateArgs {
    /// The flags, before anything loads (exit code 2 naming the flag).
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.sampling.validate()?;
        self.constraint.spec()?;
        if self.prompt.is_none() && self.messages.is_none() && self.prompt_token_ids.is_none() {
            return Err(exit::usage(
                "give a prompt: --prompt TEXT, --messages JSON or --prompt-token-ids 1,2,3",
            ));
        }
        if self.n == 0 || self.n > 128 {
            return Err(exit::usage(format!(
                "--n must be in 1..=128 (completions of the prompt), got {}",
                self.n
            )));
        }
        if self.n > 1 && !self.json {
            return Err(exit::usage(
                "--n > 1 answers with one JSON record of `choices`: add --json",
            ));
        }
        if !self.json && (self.logprobs.is_some() || self.prompt_logprobs) {
            return Err(exit::usage(
                "--logprobs and --prompt-logprobs are reported in the JSON record: add --json",
            ));
        }
        self.messages()?;
        Ok(())
    }

    /// `--messages`, parsed.
    fn messages(&self) -> Result<Option<Vec<Message>>> {
        let Some(js) = &self.messages else {
            return Ok(None);
        };
        serde_json::from_str(js).map(Some).map_err(|e| {
            exit::usage(format!(
                "--messages must be a JSON list of {{\"role\": \"system|user|assistant\", \"content\": \"...\"}}: {e}"
            ))
        })
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // Under a launcher every replica generates the same completion (a check of the whole
    // cluster); the world leader streams text, every replica leader prints its --json record.
    let world = crate::parallel::cluster()
        .world(args.model.tp)
        .map_err(anyhow::Error::msg)?;
    let Some(mut engine) = start(&args.model, world.as_ref())? else {
        return Ok(()); // a tensor-parallel peer: the leader's engine finished
    };
    let speak = world.topology().is_world_leader();
    let tok = engine.tokenizer().clone();
    let prompt = if let Some(text) = &args.prompt {
        tok.encode(text, true, false)
    } else if let Some(msgs) = args.messages()? {
        tok.encode_dialog(&msgs)
    } else if let Some(ids) = &args.prompt_token_ids {
        ids.clone()
    } else {
        bail!("internal: validate() lets no command without a prompt through");
    };
    // Meta's example defaults for completion.
    let mut params = args.sampling.params(0.6, 0.9, 0);
    params.logprobs = args.logprobs;
    params.prompt_logprobs = args.prompt_logprobs;
    params.constraint = args.constraint.spec()?;
    let n_prompt = prompt.len();
    // What is left to refuse is the prompt itself (too long, an id outside the vocabulary).
    let ids = engine
        .add_request_n(prompt, params, args.n)
        .map_err(exit::usage)?;
    let id = ids[0];
    let t0 = Instant::now();
    let mut first_token = None;
    let mut outs: Vec<Option<RequestOutput>> = vec![None; ids.len()];
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    loop {
        for ev in engine.step()? {
            match ev {
                Event::Token { id: rid, text, .. } if rid == id => {
                    first_token.get_or_insert_with(|| t0.elapsed());
                    if !args.json && speak {
                        out.write_all(text.as_bytes())?;
                        out.flush()?;
                    }
                }
                Event::Finished(res) => {
                    if let Some(k) = ids.iter().position(|&i| i == res.id) {
                        outs[k] = Some(res);
                    }
                }
                _ => {}
            }
        }
        if outs.iter().all(Option::is_some) {
            break;
        }
    }
    let outs: Vec<RequestOutput> = outs.into_iter().flatten().collect();
    let secs = t0.elapsed().as_secs_f64();
    if args.json {
        // One write of the whole line: under mpirun every replica prints its record to the same
        // stdout, and a line written in pieces can be split by another rank's.
        let line = format!("{}\n", result_record(None, &outs));
        out.write_all(line.as_bytes())?;
        out.flush()?;
    } else if speak {
        writeln!(out)?;
    }
    let n: usize = outs.iter().map(|o| o.token_ids.len()).sum();
    let ttft = first_token.map(|d| d.as_secs_f64()).unwrap_or(secs);
    tracing::info!(
        prompt_tokens = n_prompt,
        generated = n,
        finish = outs.first().map_or("?", |o| o.finish_reason.as_str()),
        ttft_ms = format!("{:.1}", ttft * 1e3),
        decode_tok_s = format!(
            "{:.1}",
            (n.saturating_sub(outs.len())) as f64 / (secs - ttft).max(1e-9)
        ),
        "done"
    );
    Ok(())
}
