//! Just enough HTTP/1.1 for the bench's client: parsing a response with a `content-length`
//! body, and a blocking one-shot probe.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

/// A parsed response.
pub struct Response {
    pub status: u16,
    /// The server said `Connection: close` (or spoke HTTP/1.0).
    pub close: bool,
    /// The worker pid at the end of a `Hello:<pid>` body.
    pub pid: Option<u32>,
}

/// Parses a complete response with a `content-length` body; `Ok(None)` = need more bytes.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response>, String> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|e| e.to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut close = status_line.starts_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let length = length.ok_or("response without content-length")?;
    let body_start = head_end + 4;
    if buf.len() < body_start + length {
        return Ok(None);
    }
    let body = &buf[body_start..body_start + length];
    let pid = std::str::from_utf8(body)
        .ok()
        .and_then(|b| b.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok());
    Ok(Some(Response { status, close, pid }))
}

/// One blocking `Connection: close` request; the pid in the body. For probing between rolls.
pub fn probe_pid(addr: SocketAddr, timeout: Duration) -> anyhow::Result<u32> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    match parse_response(&buf).map_err(anyhow::Error::msg)? {
        Some(Response {
            status: 200,
            pid: Some(pid),
            ..
        }) => Ok(pid),
        _ => anyhow::bail!("unexpected response: {:?}", String::from_utf8_lossy(&buf)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_hyper_response_and_its_pid() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\nHello:1234";
        let r = parse_response(raw).unwrap().unwrap();
        assert_eq!((r.status, r.close, r.pid), (200, true, Some(1234)));
        assert!(parse_response(&raw[..raw.len() - 1]).unwrap().is_none());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").unwrap().is_none());
    }
}
