//! `herd doctor`: what this machine has for herd. Minimal here: the GPU / CUDA section and the
//! kernel self-test (the topology and MPI sections live with the parallel code).

use anyhow::{bail, Result};

use crate::backend::cuda;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Also run every CUDA kernel against its CPU twin and a small model end-to-end
    /// (needs a GPU; exits non-zero when a check fails).
    #[arg(long)]
    pub selftest: bool,
}

pub fn run(args: DoctorArgs) -> Result<()> {
    print!("{}", cuda::report());
    if args.selftest {
        if let Err(why) = cuda::device_count() {
            bail!("--selftest needs a GPU: {why}");
        }
        println!("\nself-test (GPU vs CPU twin; rel err = ‖gpu − cpu‖ / ‖cpu‖):");
        let (table, ok) = cuda::selftest().map_err(anyhow::Error::msg)?;
        print!("{table}");
        if !ok {
            bail!("self-test FAILED (see the table above)");
        }
        println!("self-test passed");
    }
    Ok(())
}
