use clap::Parser;

fn main() {
    herd::cli::init_logging();
    let cli = herd::cli::Cli::parse();
    std::process::exit(herd::cli::run(cli));
}
