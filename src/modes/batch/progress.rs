//! Progress: a bar on a terminal, one log line every `--log-interval` seconds otherwise
//! (Slurm logs). Only the world leader reports.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Counters of one replica's run.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Records in this replica's part (done before this run included).
    pub records: u64,
    pub errors: u64,
    /// Of `records`, those found already done at start.
    pub resumed: u64,
    pub prompt_tokens: u64,
    /// Of `prompt_tokens`, those the records' usage reports served from the prefix cache.
    pub cached_prompt_tokens: u64,
    /// Prompt tokens the engine computed (recomputation after preemption and the samples'
    /// own last blocks included).
    pub computed_prompt_tokens: u64,
    pub generated_tokens: u64,
}

pub struct Progress {
    bar: Option<ProgressBar>,
    log_every: Option<Duration>,
    last_log: Instant,
    start: Instant,
    total: u64,
    /// Who speaks: "batch", or "batch: replica 0 of 2" (rank 0 sees only its own replica).
    label: String,
}

/// The prefix of a replica's log lines: with several replicas, rank 0's counts are its own share.
pub fn label(dp: usize, r: usize) -> String {
    if dp > 1 {
        format!("batch: replica {r} of {dp}")
    } else {
        "batch".into()
    }
}

impl Progress {
    /// `total`: records this replica owns; `enabled`: this rank reports.
    pub fn new(total: u64, done: u64, enabled: bool, log_interval: f64, label: String) -> Progress {
        let enabled = enabled && !crate::modes::quiet();
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = (enabled && tty).then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} records  {msg}  ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_position(done);
            b
        });
        let log_every =
            (enabled && !tty && log_interval > 0.0).then(|| Duration::from_secs_f64(log_interval));
        Progress {
            bar,
            log_every,
            last_log: Instant::now(),
            start: Instant::now(),
            total,
            label,
        }
    }

    /// Report the state now (rate-limited for logs).
    pub fn update(&mut self, c: &Counts) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let (pin, gen) = (
            c.prompt_tokens as f64 / secs,
            c.generated_tokens as f64 / secs,
        );
        if let Some(b) = &self.bar {
            b.set_position(c.records);
            b.set_message(format!(
                "{} errors  prompt {pin:.0} tok/s  generated {gen:.0} tok/s",
                c.errors
            ));
        }
        if let Some(every) = self.log_every {
            if self.last_log.elapsed() >= every {
                self.last_log = Instant::now();
                let new = c.records - c.resumed;
                let left = self.total.saturating_sub(c.records);
                let eta = if new > 0 {
                    format!("{:.0}s", left as f64 * secs / new as f64)
                } else {
                    "?".into()
                };
                eprintln!(
                    "{}: {}/{} records ({:.1}%), {} errors, prompt {pin:.0} tok/s, generated {gen:.0} tok/s, ETA {eta}",
                    self.label,
                    c.records,
                    self.total,
                    100.0 * c.records as f64 / self.total.max(1) as f64,
                    c.errors
                );
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
