//! `--config angel.toml`: the same keys as the long flags (`workers = 4`,
//! `graceful-timeout = "30s"`, ...). Flags and `ANGEL_*` variables override the file.
//!
//! The master re-reads the file on every SIGHUP; a broken file is a logged error and the
//! running configuration stays. Every error names the file and line.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::{Deserialize, Deserializer};

use crate::cli::{parse_duration, Cli, LogFormat};
use crate::settings::Apply;

/// Why the file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {} line {line}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Every setting, written once: its `Cli` field, its config-file key (the long flag name),
/// the type the file holds (with the reader that checks it), and when a change applies. This
/// one table generates the file's schema ([`FileConfig`]), the merge under the flags
/// ([`apply`]), the list of settings ([`SETTINGS`]) and the "needs a restart" report
/// ([`restart_needed`]).
macro_rules! settings_table {
    ($( $field:ident $key:literal : $ty:ty $([$de:literal])? => $apply:ident; )*) => {
        /// The file's keys; every one optional.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct FileConfig {
            $( $(#[serde(default, deserialize_with = $de)])? $field: Option<$ty>, )*
        }

        /// Every setting by its flag (and config key) name, and when a change applies.
        pub const SETTINGS: &[(&str, Apply)] = &[ $( ($key, Apply::$apply), )* ];

        /// Fills in `cli` from the file where the flag was not explicit.
        pub fn apply(cli: &mut Cli, file: FileConfig, explicit: &BTreeSet<String>) {
            $(
                if let Some(v) = file.$field {
                    if !explicit.contains(stringify!($field)) {
                        cli.$field = v.into();
                    }
                }
            )*
        }

        /// The restart-only settings that differ between what runs and a re-read file.
        pub fn restart_needed(running: &Cli, reread: &Cli) -> Vec<&'static str> {
            let mut changed = Vec::new();
            $(
                if Apply::$apply == Apply::Restart
                    && format!("{:?}", running.$field) != format!("{:?}", reread.$field)
                {
                    changed.push($key);
                }
            )*
            changed
        }
    };
}

settings_table! {
    lib "lib": PathBuf => AtRoll;
    workers "workers": NonZeroUsize => AtRoll;
    ready_timeout "ready-timeout": Duration ["ready_timeout"] => AtRoll;
    graceful_timeout "graceful-timeout": Duration ["duration"] => AtRoll;
    timeout "timeout": Duration ["timeout"] => AtRoll;
    max_requests "max-requests": u64 => AtRoll;
    max_requests_jitter "max-requests-jitter": u64 => AtRoll;
    reload_regex "reload-regex": regex::Regex ["regex"] => AtRoll;
    debounce "debounce": Duration ["duration"] => AtRoll;
    host "host": IpAddr => Restart;
    port "port": u16 => Restart;
    path "path": PathBuf => Restart;
    listen "listen": Vec<crate::listener::ListenAddr> => Restart;
    pidfile "pidfile": PathBuf => Restart;
    snapshot_dir "snapshot-dir": PathBuf => Restart;
    watch "watch": bool => Restart;
    no_zygote "no-zygote": bool => Restart;
    log_format "log-format": LogFormat => Restart;
    metrics "metrics": std::net::SocketAddr => Restart;
    user "user": String => Restart;
    group "group": String => Restart;
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Seconds(f64),
    }
    let text = match Raw::deserialize(d)? {
        Raw::Text(t) => t,
        Raw::Seconds(s) => s.to_string(),
    };
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn ready_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d)?
        .map(crate::settings::check_ready_timeout)
        .transpose()
        .map_err(serde::de::Error::custom)
}

fn timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d)?
        .map(crate::settings::check_timeout)
        .transpose()
        .map_err(serde::de::Error::custom)
}

fn regex<'de, D: Deserializer<'de>>(d: D) -> Result<Option<regex::Regex>, D::Error> {
    let text = String::deserialize(d)?;
    regex::Regex::new(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("invalid regex {text:?}: {e}")))
}

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: FileConfig = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(1, |span| {
            text.as_bytes()[..span.start.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        });
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            message: e.message().trim().to_string(),
        }
    })?;
    if let Some(w) = file.workers {
        if w.get() > crate::settings::MAX_WORKERS {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of(&text, "workers"),
                message: format!(
                    "workers = {w} is more than {}",
                    crate::settings::MAX_WORKERS
                ),
            });
        }
    }
    Ok(file)
}

fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key))
        .map_or(1, |i| i + 1)
}

/// Where the settings came from, kept by the master to re-read the file on SIGHUP.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The command line and environment alone.
    pub base: Cli,
    /// The flags given explicitly (they override the file).
    pub explicit: BTreeSet<String>,
    pub path: Option<PathBuf>,
}

impl ConfigSource {
    /// Settings without a file: what tests and `--check` without `--config` use.
    pub fn flags_only(cli: &Cli) -> Self {
        ConfigSource {
            base: cli.clone(),
            explicit: BTreeSet::new(),
            path: None,
        }
    }

    /// Re-reads the file (if any) and merges it under the flags.
    pub fn reload(&self) -> Result<Option<Cli>, ConfigError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let mut cli = self.base.clone();
        apply(&mut cli, load(path)?, &self.explicit);
        Ok(Some(cli))
    }
}

/// Which flags were given on the command line or through `ANGEL_*` variables: those win over
/// the file.
pub fn explicit_args(matches: &ArgMatches) -> BTreeSet<String> {
    matches
        .ids()
        .filter(|id| {
            matches!(
                matches.value_source(id.as_str()),
                Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
            )
        })
        .map(|id| id.as_str().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("angel.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let (_d, path) = write("lib = \"x.so\"\nworkers = 2\nwokers = 3\n");
        let err = load(&path).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("wokers") && msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn absurd_values_are_refused_with_their_line() {
        for (text, line) in [
            ("workers = 0\n", 1),
            ("port = 3000\nworkers = -1\n", 2),
            ("\nworkers = 100000\n", 2),
            ("graceful-timeout = \"soon\"\n", 1),
            ("timeout = \"30 fortnights\"\n", 1),
            ("reload-regex = \"(\"\n", 1),
            ("workers = 2\nready-timeout = \"0\"\n", 2),
            ("timeout = \"900ms\"\n", 1),
        ] {
            let (_d, path) = write(text);
            let err = load(&path).expect_err(text);
            assert!(
                err.to_string().contains(&format!("line {line}")),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn listen_takes_a_list_and_names_a_bad_entry() {
        let (_d, path) =
            write("listen = [\"127.0.0.1:8080\", \"[::1]:8080\", \"unix:/run/app.sock\"]\n");
        let file = load(&path).expect("load");
        assert_eq!(file.listen.as_ref().map(Vec::len), Some(3));
        let (_d, path) = write("workers = 2\nlisten = [\"127.0.0.1\"]\n");
        let msg = load(&path).expect_err("no port").to_string();
        assert!(
            msg.contains("line 2") && msg.contains("\"127.0.0.1\""),
            "{msg}"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let (_d, path) =
            write("lib = \"from-file.so\"\nworkers = 3\nmax-requests = 10\ngraceful-timeout = 5\n");
        let matches = Cli::command()
            .try_get_matches_from(["angel-host", "--lib", "flag.so", "--max-requests", "7"])
            .expect("parse");
        let mut cli = Cli::from_arg_matches(&matches).expect("cli");
        apply(
            &mut cli,
            load(&path).expect("load"),
            &explicit_args(&matches),
        );
        assert_eq!(cli.lib.as_deref(), Some(Path::new("flag.so")));
        assert_eq!(cli.max_requests, 7);
        assert_eq!(cli.workers.map(NonZeroUsize::get), Some(3));
        assert_eq!(cli.graceful_timeout, Duration::from_secs(5));
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[test]
    fn every_flag_of_the_master_is_a_setting_and_every_setting_a_flag() {
        let command = Cli::command();
        let flags: BTreeSet<String> = command
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !["config", "check", "help", "version"].contains(l))
            .map(str::to_string)
            .collect();
        let keys: BTreeSet<String> = SETTINGS.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(flags, keys);
    }

    #[test]
    fn a_changed_restart_only_setting_is_reported_and_an_at_roll_one_is_not() {
        let parse = |args: &[&str]| {
            let m = Cli::command().try_get_matches_from(args).expect("parse");
            Cli::from_arg_matches(&m).expect("cli")
        };
        let running = parse(&["angel-host", "--lib", "a.so", "--port", "1"]);
        let reread = parse(&[
            "angel-host",
            "--lib",
            "b.so",
            "--port",
            "2",
            "--workers",
            "3",
        ]);
        assert_eq!(restart_needed(&running, &reread), vec!["port"]);
    }
}
