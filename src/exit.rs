//! Exit codes a job script can act on (the README's table), and the error type that carries one.
//! Below `cli` and `modes`: both use them.

/// Finished, every request answered.
pub const OK: i32 = 0;
/// Failed: bad input, missing file, model error (the message says what to do).
pub const FAILED: i32 = 1;
/// Wrong command line (clap's own code), or arguments that do not fit the job (e.g. a
/// resume with different settings).
pub const USAGE: i32 = 2;
/// The model could not be loaded or failed while running.
pub const MODEL: i32 = 3;
/// Interrupted (SIGTERM/SIGINT): what was done is on disk; rerun the same command to resume.
pub const INTERRUPTED: i32 = 4;
/// Finished, but some records are error records (only with `--fail-on-error`).
pub const RECORD_ERRORS: i32 = 5;

/// An error that carries the exit code it should end the process with.
#[derive(Debug)]
pub struct Coded {
    pub code: i32,
    pub error: anyhow::Error,
}

impl Coded {
    /// Wrap an error with an exit code (use with `map_err`).
    pub fn with(code: i32) -> impl Fn(anyhow::Error) -> anyhow::Error {
        move |error| anyhow::Error::new(Coded { code, error })
    }
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Coded {}
