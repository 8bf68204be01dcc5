//! One `--listen` value: `HOST:PORT`, `[IPV6]:PORT` or `unix:PATH`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// An address to listen on, as `--listen` and the config file's `listen` key spell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address; port 0 picks a free port (the real one is logged).
    Tcp(SocketAddr),
    /// A unix stream socket at this path.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!(
                    "{s:?}: unix: needs a path, e.g. unix:/run/app.sock"
                ));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        let hint = if s.matches(':').count() > 1 && !s.starts_with('[') {
            " (an IPv6 address goes in brackets: [::1]:8080)"
        } else if !s.contains(':') {
            " (the port is missing)"
        } else {
            ""
        };
        Err(format!(
            "{s:?} is not HOST:PORT (an IP address), [IPV6]:PORT or unix:PATH{hint}"
        ))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_parse_and_print_back() {
        for s in [
            "127.0.0.1:8080",
            "[::1]:0",
            "0.0.0.0:3000",
            "unix:/run/app.sock",
        ] {
            let addr: ListenAddr = s.parse().expect(s);
            assert_eq!(addr.to_string(), s);
        }
        assert!(matches!("[::]:80".parse(), Ok(ListenAddr::Tcp(a)) if a.is_ipv6()));
        assert!(matches!("unix:rel.sock".parse(), Ok(ListenAddr::Unix(_))));
    }

    #[test]
    fn bad_values_are_named_with_a_hint() {
        for (s, hint) in [
            ("::1:8080", "brackets"),
            ("127.0.0.1", "port is missing"),
            ("localhost:80", "not HOST:PORT"),
            ("127.0.0.1:99999", "not HOST:PORT"),
            ("unix:", "needs a path"),
            ("", "port is missing"),
        ] {
            let err = s.parse::<ListenAddr>().expect_err(s);
            assert!(err.contains(&format!("{s:?}")), "{s}: {err}");
            assert!(err.contains(hint), "{s}: {err}");
        }
    }
}
