//! A minimal, honest HTTP/1.1 client on raw sockets.
//!
//! Honest means: every connect, read or write error, every timeout and every non-2xx status is
//! reported to the caller as a failure. Nothing is retried behind the caller's back; a keep-alive
//! [`Client`] only opens a new connection when the previous response said `Connection: close` (or
//! when the previous request failed, which was already reported).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Bound on each single socket operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a host listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// A TCP listener.
    Tcp(SocketAddr),
    /// A unix stream socket.
    Unix(PathBuf),
}

impl Addr {
    /// Parses what the master logs after `listening on `: `127.0.0.1:41234` or `unix:/abs/path`.
    pub fn parse(s: &str) -> Option<Addr> {
        let s = s.trim();
        match s.strip_prefix("unix:") {
            Some(path) => Some(Addr::Unix(PathBuf::from(path))),
            None => s.parse().ok().map(Addr::Tcp),
        }
    }

    /// The TCP address; panics for a unix socket.
    pub fn tcp(&self) -> SocketAddr {
        match self {
            Addr::Tcp(a) => *a,
            Addr::Unix(p) => panic!("expected a TCP address, got unix:{}", p.display()),
        }
    }
}

/// One client connection, TCP or unix.
#[derive(Debug)]
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream.
    Unix(UnixStream),
}

impl Conn {
    /// Connects with [`IO_TIMEOUT`] on connect, reads and writes.
    pub fn connect(addr: &Addr) -> io::Result<Conn> {
        let conn = match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, IO_TIMEOUT)?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
            Addr::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
        };
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        match &conn {
            Conn::Tcp(s) => s.set_write_timeout(Some(IO_TIMEOUT))?,
            Conn::Unix(s) => s.set_write_timeout(Some(IO_TIMEOUT))?,
        }
        Ok(conn)
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Half-closes the write side.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The de-chunked body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the server will close the connection after this response.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

fn err(ctx: &str, e: impl std::fmt::Display) -> String {
    format!("{ctx}: {e}")
}

fn write_request(conn: &mut Conn, path: &str, close: bool) -> Result<(), String> {
    let conn_hdr = if close { "Connection: close\r\n" } else { "" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: angel-test\r\n{conn_hdr}\r\n");
    conn.write_all(req.as_bytes()).map_err(|e| err("write", e))
}

fn read_line(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    let n = r.read_line(&mut line).map_err(|e| err("read", e))?;
    if n == 0 {
        return Err("read: connection closed (EOF) before a complete response".into());
    }
    if !line.ends_with("\r\n") {
        return Err(format!("read: truncated line {line:?}"));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

/// Reads a status line and headers.
fn read_head(r: &mut impl BufRead) -> Result<(u16, Vec<(String, String)>), String> {
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok((status, headers))
}

/// Reads one chunk of a chunked body; `None` at the terminal chunk (trailers consumed).
fn read_chunk(r: &mut impl BufRead) -> Result<Option<Vec<u8>>, String> {
    let size_line = read_line(r)?;
    let size_hex = size_line.split(';').next().unwrap_or_default().trim();
    let size = usize::from_str_radix(size_hex, 16)
        .map_err(|_| format!("bad chunk size line {size_line:?}"))?;
    if size == 0 {
        // Trailers, then the blank line.
        while !read_line(r)?.is_empty() {}
        return Ok(None);
    }
    let mut data = vec![0; size];
    r.read_exact(&mut data).map_err(|e| err("read chunk", e))?;
    if !read_line(r)?.is_empty() {
        return Err("chunk not followed by CRLF".into());
    }
    Ok(Some(data))
}

fn read_response(r: &mut impl BufRead) -> Result<Response, String> {
    let (status, headers) = read_head(r)?;
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        while let Some(chunk) = read_chunk(r)? {
            body.extend_from_slice(&chunk);
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad content-length {len:?}"))?;
        body.resize(len, 0);
        r.read_exact(&mut body).map_err(|e| err("read body", e))?;
    } else if status >= 200 && status != 204 && status != 304 {
        r.read_to_end(&mut body).map_err(|e| err("read body", e))?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn check_2xx(resp: Response) -> Result<Response, String> {
    if (200..300).contains(&resp.status) {
        Ok(resp)
    } else {
        Err(format!("status {} body {:?}", resp.status, resp.text()))
    }
}

/// `GET path` on a new connection (`Connection: close`); any error or non-2xx is an `Err`.
pub fn get(addr: &Addr, path: &str) -> Result<Response, String> {
    let mut conn = Conn::connect(addr).map_err(|e| err("connect", e))?;
    write_request(&mut conn, path, true)?;
    check_2xx(read_response(&mut BufReader::new(conn))?)
}

/// A keep-alive client: one connection reused until a response carries `Connection: close` or
/// a request fails (the failure is returned; the next request opens a new connection).
#[derive(Debug)]
pub struct Client {
    addr: Addr,
    conn: Option<BufReader<Conn>>,
    /// Connections opened so far.
    pub connections: u64,
}

impl Client {
    /// A client that connects lazily.
    pub fn new(addr: &Addr) -> Client {
        Client {
            addr: addr.clone(),
            conn: None,
            connections: 0,
        }
    }

    /// `GET path`; any error or non-2xx is an `Err`.
    pub fn get(&mut self, path: &str) -> Result<Response, String> {
        let result = self.try_get(path);
        match &result {
            Ok(r) if !r.closes() => {}
            _ => self.conn = None,
        }
        result.and_then(check_2xx)
    }

    fn try_get(&mut self, path: &str) -> Result<Response, String> {
        self.try_send(path)?;
        read_response(self.conn.as_mut().expect("connected by try_send"))
    }

    fn try_send(&mut self, path: &str) -> Result<(), String> {
        if self.conn.is_none() {
            let c = Conn::connect(&self.addr).map_err(|e| err("connect", e))?;
            self.connections += 1;
            self.conn = Some(BufReader::new(c));
        }
        let conn = self.conn.as_mut().expect("connected above");
        write_request(conn.get_mut(), path, false)
    }

    /// Writes `GET path` without reading the response (see [`Client::receive`]): for requests
    /// that must be in flight while the test does something else.
    pub fn send(&mut self, path: &str) -> Result<(), String> {
        let result = self.try_send(path);
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// Reads the response to a request written by [`Client::send`]; errors as [`Client::get`].
    pub fn receive(&mut self) -> Result<Response, String> {
        let conn = self.conn.as_mut().ok_or("receive without a connection")?;
        let result = read_response(conn);
        match &result {
            Ok(r) if !r.closes() => {}
            _ => self.conn = None,
        }
        result.and_then(check_2xx)
    }
}

/// A response whose body is read chunk by chunk as it streams (for the ticker).
#[derive(Debug)]
pub struct Streaming {
    reader: BufReader<Conn>,
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Streaming {
    /// Sends `GET path` and reads the head; the body must be chunked.
    pub fn open(addr: &Addr, path: &str) -> Result<Streaming, String> {
        let mut conn = Conn::connect(addr).map_err(|e| err("connect", e))?;
        write_request(&mut conn, path, false)?;
        let mut reader = BufReader::new(conn);
        let (status, headers) = read_head(&mut reader)?;
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        if !chunked {
            return Err(format!("expected a chunked body, got headers {headers:?}"));
        }
        Ok(Streaming {
            reader,
            status,
            headers,
        })
    }

    /// The next chunk, `Ok(None)` at the clean terminal chunk, `Err` on reset/EOF/timeout.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        read_chunk(&mut self.reader)
    }

    /// After the terminal chunk: waits for the server to close, and says how (`Ok(())` = FIN).
    pub fn wait_close(&mut self) -> Result<(), String> {
        let mut rest = Vec::new();
        self.reader
            .read_to_end(&mut rest)
            .map_err(|e| err("waiting for the server to close", e))?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected bytes after the body: {rest:?}"))
        }
    }
}
