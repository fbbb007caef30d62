fn main() {
    // MPI comes up before anything else (logging needs to know the rank; MPI must own the process
    // before threads start).
    let guard = match herd::parallel::init() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("herd: error: {e}");
            std::process::exit(herd::exit::FAILED);
        }
    };
    herd::cli::abort_on_panic();
    let code = match herd::cli::parse() {
        Ok(cli) => {
            herd::cli::init_logging(&cli.log);
            herd::cli::run(cli)
        }
        Err(e) => {
            // Only rank 0 prints usage and help; every rank exits the same way.
            if herd::parallel::cluster().world_rank == 0 {
                let _ = e.print();
            }
            e.exit_code()
        }
    };
    // Finalize MPI before exiting (process::exit runs no destructors).
    guard.finalize();
    std::process::exit(code);
}
