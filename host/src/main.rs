//! `angel-host`: parses arguments and hands over to the master or the hidden worker mode.

use std::process::ExitCode;

use angel_host::cli::Cli;
use angel_host::log::{self, Role};
use angel_host::{master, worker};
use clap::Parser;

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == worker::WORKER_MODE) {
        log::init(Role::Worker);
        let code = match worker::WorkerArgs::parse(args) {
            Ok(parsed) => worker::run(parsed),
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        };
        // SAFETY: `_exit` ends the process without running atexit handlers or the app's TLS
        // destructors, which could race with app threads still alive (tokio's blocking pool).
        // The app has drained and returned; stderr is unbuffered, so nothing is lost.
        unsafe { libc::_exit(code) }
    }
    let cli = Cli::parse();
    log::init(Role::Master);
    if cli.check {
        return match master::check(&cli) {
            Ok(summary) => {
                println!("angel-host: {summary}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e, e.exit_code()),
        };
    }
    match master::run(&cli) {
        Ok(code) => code,
        Err(e) => fail(&e, e.exit_code()),
    }
}

/// Prints `error: ...` with the cause chain on one line and returns the exit code.
fn fail(e: &dyn std::error::Error, code: u8) -> ExitCode {
    let mut line = format!("error: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
        source = cause_of(source);
    }
    eprintln!("{line}");
    ExitCode::from(code)
}

fn cause_of<'a>(
    e: Option<&'a (dyn std::error::Error + 'static)>,
) -> Option<&'a (dyn std::error::Error + 'static)> {
    e.and_then(|e| e.source())
}
