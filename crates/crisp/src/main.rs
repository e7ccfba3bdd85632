//! The `crisp` command: runs a regional node (`serve`), a whole demo federation on loopback
//! (`up`), and manages the profile lock file (`profiles`).

use std::process::ExitCode;

use clap::Parser;

mod certs;
mod cli;
mod observe;
mod up;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
