//! `herd chat`: the console chat of AIME's llama3_chat, done well: streaming answers, multi-turn
//! history trimmed from the oldest turns, line editing, Ctrl-C stops the answer (not the program).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use rustyline::error::ReadlineError;

use super::setup::{build_engine, ModelArgs};
use super::SamplingArgs;
use crate::engine::{Event, FinishReason};
use crate::tokenizer::{Message, Role, Tokenizer};

pub const DEFAULT_SYSTEM: &str =
    "You are Dave, a helpful assistant. You answer clearly and concisely, \
and you say so when you do not know something.";

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt (kept when old turns are dropped to fit the context).
    #[arg(long, default_value = DEFAULT_SYSTEM)]
    pub system: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Every answer follows this constraint.
    #[command(flatten)]
    pub constraint: super::constraint_fields::ConstraintArgs,
}

const HELP: &str =
    "commands: /reset (forget the conversation), /system TEXT (new system prompt, resets), \
/help, /quit (or Ctrl-D). Ctrl-C stops the current answer.";

/// The conversation, trimmed to fit the context.
pub struct History {
    pub system: String,
    pub turns: Vec<Message>,
}

impl History {
    fn dialog(&self) -> Vec<Message> {
        let mut d = vec![Message {
            role: Role::System,
            content: self.system.clone(),
        }];
        d.extend(self.turns.iter().cloned());
        d
    }

    /// Prompt tokens for the next answer, dropping the oldest turns until `room` tokens remain for
    /// the answer within `max_len`. `None` if even the last message alone does not fit.
    pub fn prompt(&mut self, tok: &Tokenizer, max_len: usize, room: usize) -> Option<Vec<u32>> {
        loop {
            let ids = tok.encode_dialog(&self.dialog());
            if ids.len() + room <= max_len {
                return Some(ids);
            }
            if self.turns.len() <= 1 {
                return None;
            }
            // Drop the oldest exchange (a user turn and the answer to it).
            let n = if self.turns.len() >= 2 && self.turns[1].role == Role::Assistant {
                2
            } else {
                1
            };
            self.turns.drain(..n);
        }
    }
}

impl ChatArgs {
    /// The flags, before anything loads (exit code 2 naming the flag).
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.sampling.validate()?;
        self.constraint.spec().map(|_| ())
    }
}

pub fn run(args: ChatArgs) -> Result<()> {
    let mut engine = build_engine(&args.model)?;
    // llama3_chat's defaults.
    let mut params = args.sampling.params(0.8, 0.9, 40);
    params.constraint = args.constraint.spec()?;
    // A constraint that does not compile is a bad flag, said before the first message.
    if let Some(spec) = &params.constraint {
        engine
            .grammars()
            .compile(spec)
            .map_err(crate::exit::usage)?;
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    // SIGTERM, SIGUSR1, SIGUSR2 (docker stop, mpirun, Slurm) end the chat at once with the
    // interrupted code: a conversation keeps nothing on disk. Without a handler, herd as a
    // container's process 1 would ignore them until the runtime's SIGKILL.
    super::signals::quit_on(crate::exit::INTERRUPTED)?;
    let interactive = std::io::stdin().is_terminal();
    let mut rl = rustyline::DefaultEditor::new()?;
    let mut history = History {
        system: args.system.clone(),
        turns: Vec::new(),
    };
    let max_len = engine.max_len();
    // Room kept for the answer when trimming the history.
    let room = params.max_tokens.min(max_len / 2).max(1);
    if interactive {
        println!("herd chat with {} — {HELP}", args.model.model);
    }
    let stdout = std::io::stdout();
    loop {
        let line = match rl.readline(if interactive { "\n> " } else { "" }) {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(input);
        match input {
            "/quit" | "/exit" => break,
            "/help" => {
                println!("{HELP}");
                continue;
            }
            "/reset" => {
                history.turns.clear();
                println!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        if let Some(sys) = input.strip_prefix("/system") {
            history.system = sys.trim().to_string();
            history.turns.clear();
            println!("(system prompt set, conversation reset)");
            continue;
        }
        if input.starts_with('/') {
            println!("unknown command {input}; {HELP}");
            continue;
        }
        history.turns.push(Message {
            role: Role::User,
            content: input.to_string(),
        });
        let Some(prompt) = history.prompt(engine.tokenizer(), max_len, room) else {
            println!("(that message is too long for the context of {max_len} tokens; not sent)");
            history.turns.pop();
            continue;
        };
        let mut p = params.clone();
        p.max_tokens = p.max_tokens.min(max_len - prompt.len());
        let id = engine.add_request(prompt, p)?;
        interrupted.store(false, Ordering::SeqCst);
        let mut out = stdout.lock();
        let mut answer = None;
        while answer.is_none() {
            if interrupted.swap(false, Ordering::SeqCst) {
                answer = engine.abort(id);
                break;
            }
            for ev in engine.step()? {
                match ev {
                    Event::Token { text, .. } => {
                        out.write_all(text.as_bytes())?;
                        out.flush()?;
                    }
                    Event::Finished(res) => answer = Some(res),
                }
            }
        }
        writeln!(out)?;
        if let Some(res) = answer {
            if res.finish_reason == FinishReason::Abort {
                writeln!(out, "(stopped)")?;
            }
            history.turns.push(Message {
                role: Role::Assistant,
                content: res.text,
            });
        }
    }
    Ok(())
}
