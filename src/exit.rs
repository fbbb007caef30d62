//! Exit codes a job script can act on (the README's table), and the error type that carries one.
//! Below `cli` and `modes`: both use them.

/// Finished, every request answered.
pub const OK: i32 = 0;
/// Failed: I/O or another error (the message says what is wrong and what to do).
pub const FAILED: i32 = 1;
/// Bad arguments: a wrong command line (clap's own code), a flag out of its range, or arguments
/// that do not fit the job (e.g. a resume with different settings).
pub const USAGE: i32 = 2;
/// The model could not be found or loaded, or failed while running.
pub const MODEL: i32 = 3;
/// Interrupted (SIGTERM/SIGINT/SIGUSR1/SIGUSR2): what was done is on disk; rerun the same command to resume.
pub const INTERRUPTED: i32 = 4;
/// Finished, but some records are error records (only with `--fail-on-error`).
pub const RECORD_ERRORS: i32 = 5;

/// An error that carries the exit code it should end the process with.
#[derive(Debug)]
pub struct Coded {
    pub code: i32,
    pub error: anyhow::Error,
    /// Every rank of the world ends this way, having agreed on it: no MPI_Abort, and only
    /// world rank 0 prints the message.
    pub together: bool,
}

impl Coded {
    /// Wrap an error with an exit code (use with `map_err`). An error that already carries a code
    /// keeps it: the innermost code is the most specific (a bad `--tp` found while loading is
    /// still a bad argument, not a model failure).
    pub fn with(code: i32) -> impl Fn(anyhow::Error) -> anyhow::Error {
        move |error| {
            if error.downcast_ref::<Coded>().is_some() {
                error
            } else {
                anyhow::Error::new(Coded {
                    code,
                    error,
                    together: false,
                })
            }
        }
    }

    /// An end every rank of the world reaches with the same code, at the same time (e.g.
    /// batch's interrupted run, or its refused output).
    pub fn together(code: i32) -> impl Fn(anyhow::Error) -> anyhow::Error {
        move |error| {
            anyhow::Error::new(Coded {
                code,
                error,
                together: true,
            })
        }
    }
}

/// A bad-arguments error (exit 2) saying `msg`.
pub fn usage(msg: impl std::fmt::Display) -> anyhow::Error {
    Coded::with(USAGE)(anyhow::anyhow!("{msg}"))
}

/// The code `error` should end the process with: its own; else [`MODEL`] for the model's own
/// failure (a checkpoint it cannot read, a backend fault in a step, wherever a mode met it);
/// else [`FAILED`].
pub fn code_of(error: &anyhow::Error) -> i32 {
    match error.downcast_ref::<Coded>() {
        Some(c) => c.code,
        None if error.downcast_ref::<crate::model::ModelError>().is_some() => MODEL,
        None => FAILED,
    }
}

/// Whether every rank ends with `error` together (see [`Coded::together`]).
pub fn is_together(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Coded>().is_some_and(|c| c.together)
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Coded {}
