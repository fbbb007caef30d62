//! `herd convert` (placeholder while the writer lands).
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {}

pub fn run(_args: ConvertArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
