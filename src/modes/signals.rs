//! The signals that stop herd cleanly: the same set for every mode that runs long.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};

/// SIGTERM (Slurm, `docker stop`), SIGINT (Ctrl-C), and SIGUSR1 / SIGUSR2 for launchers: mpirun
/// forwards those to every rank and lets the ranks end on their own (a SIGTERM it answers by
/// killing them within seconds), and Slurm sends them ahead of a time limit
/// (`--signal=B:USR1@120`).
pub const STOP: [i32; 4] = [SIGTERM, SIGINT, SIGUSR1, SIGUSR2];

/// The signals that end a program with no work to save at once (`chat`): all of [`STOP`] but
/// Ctrl-C, which only stops the answer being written.
pub const QUIT: [i32; 3] = [SIGTERM, SIGUSR1, SIGUSR2];

/// A stop signal sets `stop`.
pub fn on_stop(stop: &Arc<AtomicBool>) -> std::io::Result<()> {
    for sig in STOP {
        signal_hook::flag::register(sig, Arc::clone(stop))?;
    }
    Ok(())
}

/// A stop signal sets `stop`; a second one exits the process at once with `code`.
pub fn on_stop_then_exit(stop: &Arc<AtomicBool>, code: i32) -> std::io::Result<()> {
    for sig in STOP {
        // Registered first, so it sees the flag as it was before this signal.
        signal_hook::flag::register_conditional_shutdown(sig, code, Arc::clone(stop))?;
        signal_hook::flag::register(sig, Arc::clone(stop))?;
    }
    Ok(())
}

/// One of [`QUIT`] exits the process at once with `code`.
pub fn quit_on(code: i32) -> std::io::Result<()> {
    let always = Arc::new(AtomicBool::new(true));
    for sig in QUIT {
        signal_hook::flag::register_conditional_shutdown(sig, code, Arc::clone(&always))?;
    }
    Ok(())
}
