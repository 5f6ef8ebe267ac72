//! `stowage healthcheck`: one HTTP GET of the server's `/livez` (or any URL), for container
//! runtimes whose image has no curl (Docker's `HEALTHCHECK`, compose `healthcheck:`).
//!
//! Exit 0 when the answer's status is 2xx, 1 otherwise (no connection, a timeout, another
//! status), with one line on stderr saying which. The URL defaults to `/livez` at the address
//! `stowage serve` would listen on under the same configuration (`STOWAGE_LISTEN`, the TOML
//! file), an unspecified address (`0.0.0.0`, `::`) replaced by loopback, over `https://` when
//! `[tls]` is set. Over HTTPS the certificate is NOT verified: the check only asks whether the
//! process answers, sends no credentials and reads nothing but the status line, and a
//! certificate made for the public name never matches the loopback address anyway.
//!
//! Plain blocking std I/O on the calling thread: the command runs nothing else.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;

/// The most of the answer read: the status line is all that matters.
const MAX_HEAD: usize = 8 * 1024;

/// A parsed `http(s)://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    /// Host as written (brackets kept for IPv6), for the `Host` header and TLS server name.
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!("{url:?}: expected an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(after) = authority.strip_prefix('[') {
            let (h, tail) = after
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed '[' in the host"))?;
            (format!("[{h}]"), tail.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(format!("{url:?}: no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("{url:?}: invalid port {p:?}"))?,
            None if tls => 443,
            None => 80,
        };
        Ok(Target {
            tls,
            host,
            port,
            path: path.to_owned(),
        })
    }

    /// `/livez` of the server `config` describes.
    pub fn for_config(config: &Config) -> Target {
        let ip = match config.listen.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Target {
            tls: config.tls.cert.is_some(),
            host: match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            },
            port: config.listen.port(),
            path: "/livez".to_owned(),
        }
    }

    pub fn url(&self) -> String {
        format!(
            "{}://{}:{}{}",
            if self.tls { "https" } else { "http" },
            self.host,
            self.port,
            self.path
        )
    }
}

/// GETs `target` within `timeout` (connecting, sending and reading together); the status code.
pub fn check(target: &Target, timeout: Duration) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let bare = target.host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (bare, target.port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {}: {e}", target.host))?
        .collect();
    let mut last = format!("{} resolves to no address", target.host);
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, remaining(deadline)?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    let mut tcp = stream.ok_or(last)?;
    tcp.set_read_timeout(Some(remaining(deadline)?))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(remaining(deadline)?))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: stowage-healthcheck\r\nConnection: close\r\n\r\n",
        target.path, target.host, target.port
    );
    let head = if target.tls {
        let config = insecure_tls_config()?;
        let name = rustls::pki_types::ServerName::try_from(bare.to_owned())
            .map_err(|e| format!("TLS server name {bare:?}: {e}"))?;
        let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| format!("TLS: {e}"))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        exchange(&mut tls, request.as_bytes())?
    } else {
        exchange(&mut tcp, request.as_bytes())?
    };
    status_of(&head)
}

fn remaining(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".to_owned());
    }
    Ok(left)
}

/// Sends `request`, reads until the end of the status line (or [`MAX_HEAD`], or EOF).
fn exchange(stream: &mut (impl Read + Write), request: &[u8]) -> Result<Vec<u8>, String> {
    stream.write_all(request).map_err(|e| format!("sending: {e}"))?;
    stream.flush().map_err(|e| format!("sending: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.contains(&b'\n') && head.len() < MAX_HEAD {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
    Ok(head)
}

/// The status of an `HTTP/1.x NNN …` status line.
fn status_of(head: &[u8]) -> Result<u16, String> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    match (words.next(), words.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/") => Ok(code),
        _ if line.is_empty() => Err("the server closed the connection without answering".to_owned()),
        _ => Err(format!("not an HTTP answer: {:?}", line.trim_end())),
    }
}

/// A TLS client that accepts any certificate (see the module doc for why that is right here).
fn insecure_tls_config() -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let t = Target::parse("http://127.0.0.1:5000/livez").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (false, "127.0.0.1", 5000, "/livez")
        );
        let t = Target::parse("https://[::1]:8443").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (true, "[::1]", 8443, "/")
        );
        assert_eq!(Target::parse("http://localhost/x").unwrap().port, 80);
        for bad in ["ftp://x", "http://", "http://h:notaport/", "http://[::1/"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_default_is_livez_on_loopback() {
        let mut c = Config {
            listen: "0.0.0.0:5000".parse().unwrap(),
            ..Config::default()
        };
        assert_eq!(Target::for_config(&c).url(), "http://127.0.0.1:5000/livez");
        c.listen = "[::]:6000".parse().unwrap();
        c.tls.cert = Some("/c.pem".into());
        assert_eq!(Target::for_config(&c).url(), "https://[::1]:6000/livez");
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n"), Ok(200));
        assert_eq!(status_of(b"HTTP/1.0 503 Service Unavailable\r\n"), Ok(503));
        assert!(status_of(b"").is_err());
        assert!(status_of(b"SSH-2.0-OpenSSH\r\n").is_err());
    }
}
