//! `angel-host`: parses arguments and hands over to the master or the hidden worker mode.

use std::process::ExitCode;

use angel_host::cli::{Cli, Command, LogFormat};
use angel_host::config::{self, ConfigSource};
use angel_host::ctl::{self, Client, CtlError, Request};
use angel_host::log::{self, Role};
use angel_host::{master, worker};
use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == worker::WORKER_MODE) {
        let code = match worker::WorkerArgs::parse(args) {
            Ok(parsed) => {
                let format = if parsed.log_json {
                    LogFormat::Json
                } else {
                    LogFormat::Seed
                };
                log::init(Role::Worker(parsed.generation), format);
                // The host's own code in the worker (the app's std has its own hook, set by
                // the SDK) logs a panic as one line in the active format.
                std::panic::set_hook(Box::new(|info| {
                    tracing::error!(event = "panic", "host panicked: {info}");
                }));
                worker::run(parsed)
            }
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
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(command) = &cli.command {
        return match run_command(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, e.exit_code(), LogFormat::Seed),
        };
    }
    let source = ConfigSource {
        base: cli.clone(),
        explicit: config::explicit_args(&matches),
        path: cli.config.clone(),
    };
    if let Some(path) = &source.path {
        match config::load(path) {
            Ok(file) => config::apply(&mut cli, file, &source.explicit),
            Err(e) => {
                log::init(Role::Master, cli.log_format);
                return fail(&e, 2, cli.log_format);
            }
        }
    }
    let format = cli.log_format;
    log::init(Role::Master, format);
    if cli.lib.is_none() {
        let e = std::io::Error::other(
            "no library: give --lib PATH (or `lib = \"...\"` in the --config file)",
        );
        return fail(&e, 2, format);
    }
    if cli.check {
        return match master::check(&cli) {
            Ok(summary) => {
                println!("angel-host: {summary}");
                ExitCode::SUCCESS
            }
            // A library that does not pass the probe, or a snapshot location that fails.
            Err(e) => fail(&e, 3, format),
        };
    }
    match master::run(&cli, source) {
        Ok(code) => code,
        Err(e) => fail(&e, e.exit_code(), format),
    }
}

/// Reports a fatal error — `error: ...` with the cause chain on one line, or a JSON `fatal`
/// event — and returns the exit code.
fn fail(e: &dyn std::error::Error, code: u8, format: LogFormat) -> ExitCode {
    let line = error_line(e);
    // A new master of an upgrade tells the old one why it gives up.
    master::upgrade::report_failure(&line);
    match format {
        LogFormat::Seed => eprintln!("{line}"),
        LogFormat::Json => tracing::error!(event = "fatal", exit_code = code, "{line}"),
    }
    ExitCode::from(code)
}

/// `error: what: cause: cause`.
fn error_line(e: &dyn std::error::Error) -> String {
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
    line
}

fn cause_of<'a>(
    e: Option<&'a (dyn std::error::Error + 'static)>,
) -> Option<&'a (dyn std::error::Error + 'static)> {
    e.and_then(|e| e.source())
}

/// `angel-host reload|stop|status`: one request to the master named by the pidfile.
fn run_command(command: &Command) -> Result<(), CtlError> {
    match command {
        Command::Status { pidfile, json } => {
            let mut client = Client::connect(pidfile)?;
            let line = client.call(Request::Status, Some(std::time::Duration::from_secs(5)))?;
            if *json {
                print!("{line}");
                return Ok(());
            }
            let status: ctl::Status =
                serde_json::from_str(&line).map_err(|e| CtlError::Failed {
                    pid: client.pid,
                    message: format!("unreadable status: {e}"),
                })?;
            print!("{}", ctl::format_status(&status));
            Ok(())
        }
        Command::Reload { pidfile, timeout } => outcome(pidfile, Request::Reload, *timeout),
        Command::Upgrade { pidfile, timeout } => outcome(pidfile, Request::Upgrade, *timeout),
        Command::Stop {
            pidfile,
            fast,
            timeout,
        } => {
            let mut client = Client::connect(pidfile)?;
            let request = if *fast {
                Request::StopFast
            } else {
                Request::Stop
            };
            client.call(request, Some(*timeout))?;
            client.wait_closed(Some(*timeout))?;
            println!("stopped master {}", client.pid);
            Ok(())
        }
    }
}

/// `reload` and `upgrade`: one request, answered with its outcome once it is over.
fn outcome(
    pidfile: &std::path::Path,
    request: Request,
    timeout: std::time::Duration,
) -> Result<(), CtlError> {
    let mut client = Client::connect(pidfile)?;
    let line = client.call(request, Some(timeout))?;
    let outcome: ctl::ReloadOutcome =
        serde_json::from_str(&line).map_err(|e| CtlError::Failed {
            pid: client.pid,
            message: format!("unreadable answer: {e}"),
        })?;
    if outcome.ok {
        println!("{}", outcome.message);
        Ok(())
    } else {
        Err(CtlError::Failed {
            pid: client.pid,
            message: outcome.message,
        })
    }
}
