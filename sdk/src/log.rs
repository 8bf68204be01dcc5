//! Logging through the host: lines come out in the host's format, prefixed `worker[pid]`.

use crate::abi;

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something looks wrong but serving goes on.
    Warn,
    /// A lifecycle event worth one line.
    Info,
    /// Detail for debugging.
    Debug,
}

impl Level {
    fn to_abi(self) -> u32 {
        match self {
            Self::Error => abi::LOG_ERROR,
            Self::Warn => abi::LOG_WARN,
            Self::Info => abi::LOG_INFO,
            Self::Debug => abi::LOG_DEBUG,
        }
    }
}

/// Logs one line through the host (to stderr outside a running worker). Prefer the
/// [`info!`](crate::info), [`warn!`](crate::warn), [`error!`](crate::error) and
/// [`debug!`](crate::debug) macros.
pub fn log(level: Level, msg: &str) {
    crate::host::log(level.to_abi(), msg);
}

/// Logs a formatted line at [`Level::Info`](crate::Level::Info): `angel::info!("loaded {n} routes")`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => {
        $crate::log($crate::Level::Info, &::std::format!($($arg)+))
    };
}

/// Logs a formatted line at [`Level::Warn`](crate::Level::Warn).
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => {
        $crate::log($crate::Level::Warn, &::std::format!($($arg)+))
    };
}

/// Logs a formatted line at [`Level::Error`](crate::Level::Error).
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => {
        $crate::log($crate::Level::Error, &::std::format!($($arg)+))
    };
}

/// Logs a formatted line at [`Level::Debug`](crate::Level::Debug).
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => {
        $crate::log($crate::Level::Debug, &::std::format!($($arg)+))
    };
}
