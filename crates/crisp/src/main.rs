//! The `crisp` command: runs a regional node (`serve`), a whole demo federation on loopback
//! (`up`), and manages the profile lock file (`profiles`).

use std::process::ExitCode;

use clap::Parser;

mod access;
mod audit;
mod certs;
mod check;
mod cli;
mod observe;
mod sim;
mod up;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let telemetry = match observe::init(
        cli.default_log_level(),
        cli.log_format,
        cli.otlp_endpoint.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot set up tracing: {e:#}");
            return ExitCode::FAILURE;
        }
    };
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
    let result = runtime.block_on(cli::run(cli));
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
