//! Request parsing shared by the handlers: path parameters, query strings, range headers and
//! bodies, each turned into a typed value or the right OCI error.
//!
//! Bodies are read under time limits ([`BodyTimeouts`], from `[server]` in the configuration,
//! set once at start-up): a body that goes [`BodyTimeouts::idle`] without a byte while a handler
//! waits for it ends with an error, and a small body read whole ([`read_limited`]) must arrive
//! within [`BodyTimeouts::small_total`]. Either way the request fails with 400 and an OCI error
//! body naming the timeout, and the connection closes (its body was not read to the end), so a
//! client that opens requests and dribbles or stops holds nothing for longer than that.

use actix_web::HttpRequest;
use actix_web::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use crate::error::{Error, Result};
use crate::oci::{Digest, Reference, RepoName};
use crate::registry::ChunkRange;
use crate::registry::blobs::ByteRange;

/// The `{name}` path parameter as a validated repository name.
pub fn repo(req: &HttpRequest) -> Result<RepoName> {
    req.match_info().get("name").unwrap_or_default().parse()
}

/// A named path parameter as a digest.
pub fn digest_param(req: &HttpRequest, param: &str) -> Result<Digest> {
    req.match_info().get(param).unwrap_or_default().parse()
}

/// The `{reference}` path parameter.
pub fn reference(req: &HttpRequest) -> Result<Reference> {
    req.match_info().get("reference").unwrap_or_default().parse()
}

/// The query string as key/value pairs (percent-decoded). A malformed query yields no pairs.
pub fn query(req: &HttpRequest) -> Vec<(String, String)> {
    actix_web::web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .unwrap_or_default()
}

/// First value of a query parameter.
pub fn query_param<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn header_str<'a>(req: &'a HttpRequest, name: &HeaderName) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// `Content-Length`, when present and well-formed.
pub fn content_length(req: &HttpRequest) -> Option<u64> {
    header_str(req, &CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

/// `Content-Type`, when present.
pub fn content_type(req: &HttpRequest) -> Option<String> {
    header_str(req, &CONTENT_TYPE).map(str::to_owned)
}

/// An upload chunk's `Content-Range: <start>-<end>`. `Ok(None)` when absent, `Err(())` when
/// malformed.
pub fn chunk_range(req: &HttpRequest) -> std::result::Result<Option<ChunkRange>, ()> {
    let Some(raw) = req.headers().get("content-range") else {
        return Ok(None);
    };
    let raw = raw.to_str().map_err(|_| ())?.trim();
    let (a, b) = raw.split_once('-').ok_or(())?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return Err(());
    }
    let start = a.parse().map_err(|_| ())?;
    let end = b.parse().map_err(|_| ())?;
    if end < start {
        return Err(());
    }
    Ok(Some(ChunkRange { start, end }))
}

/// A blob GET's `Range: bytes=…`. Absent or of another unit: `Ok(None)` (serve it whole).
/// A `bytes` range that does not parse, or asks for several ranges, is unsatisfiable.
pub fn byte_range(req: &HttpRequest) -> std::result::Result<Option<ByteRange>, ()> {
    let Some(raw) = req.headers().get("range") else {
        return Ok(None);
    };
    let raw = raw.to_str().map_err(|_| ())?.trim();
    let Some(spec) = raw.strip_prefix("bytes=") else {
        return Ok(None);
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return Err(());
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let num = |s: &str| -> std::result::Result<u64, ()> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(());
        }
        s.parse().map_err(|_| ())
    };
    Ok(Some(match (a.trim(), b.trim()) {
        ("", n) => ByteRange::Suffix(num(n)?),
        (s, "") => ByteRange::From {
            start: num(s)?,
            end: None,
        },
        (s, e) => ByteRange::From {
            start: num(s)?,
            end: Some(num(e)?),
        },
    }))
}

/// Time limits on reading request bodies.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeouts {
    /// Longest wait for the next bytes of a body (`server.body_idle_timeout_secs`).
    pub idle: Duration,
    /// Longest time to read a small body whole (`server.small_body_timeout_secs`).
    pub small_total: Duration,
}

impl Default for BodyTimeouts {
    fn default() -> Self {
        BodyTimeouts {
            idle: Duration::from_secs(30),
            small_total: Duration::from_secs(60),
        }
    }
}

static BODY_TIMEOUTS: OnceLock<BodyTimeouts> = OnceLock::new();

/// Sets the body time limits for the life of the process (the first call wins; until then the
/// defaults apply). Called once by the server at start-up.
pub fn set_body_timeouts(timeouts: BodyTimeouts) {
    if BODY_TIMEOUTS.set(timeouts).is_err() {
        tracing::debug!("body timeouts already set");
    }
}

fn body_timeouts() -> BodyTimeouts {
    BODY_TIMEOUTS.get().copied().unwrap_or_default()
}

/// A request body as a stream of `io::Result<Bytes>`, for the services; ends with a
/// `TimedOut` error when the client sends nothing for the idle timeout.
pub fn body_stream(payload: actix_web::web::Payload) -> impl Stream<Item = std::io::Result<Bytes>> + Unpin {
    IdleTimeout::new(payload.map(|r| r.map_err(std::io::Error::other)), body_timeouts().idle)
}

/// Reads a whole (small) body, refusing more than `limit` bytes, within the small-body time
/// limit and the idle timeout.
pub async fn read_limited(payload: actix_web::web::Payload, limit: usize) -> Result<Bytes> {
    let timeouts = body_timeouts();
    let mut body = body_stream(payload);
    let read = async {
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::BodyRead(e.to_string()))?;
            if buf.len() + chunk.len() > limit {
                return Err(Error::ManifestTooLarge { limit });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    match tokio::time::timeout(timeouts.small_total, read).await {
        Ok(result) => result,
        Err(_) => Err(Error::BodyRead(format!(
            "the body did not arrive within {} s",
            timeouts.small_total.as_secs()
        ))),
    }
}

/// A body stream that fails once its client has sent nothing for `idle` while it was waited on.
/// Time the consumer spends elsewhere (writing a part to storage) does not count: the clock
/// starts when a poll finds no data, and stops when data comes.
struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    done: bool,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            armed: false,
            done: false,
        }
    }
}

impl<S> Stream for IdleTimeout<S>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match this.inner.poll_next_unpin(cx) {
            Poll::Ready(item) => {
                this.armed = false;
                this.done = item.is_none();
                Poll::Ready(item)
            }
            Poll::Pending => {
                if !this.armed {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.timer.as_mut().reset(deadline);
                    this.armed = true;
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => {
                        this.done = true;
                        Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no body data for {} s", this.idle.as_secs()),
                        ))))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stalled_body_times_out_but_a_busy_consumer_does_not() {
        let idle = Duration::from_millis(300);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        let inner = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut body = IdleTimeout::new(inner, idle);
        tx.send(Ok(Bytes::from_static(b"a"))).await.unwrap();
        assert_eq!(&body.next().await.unwrap().unwrap()[..], b"a");
        // The consumer is busy for longer than the timeout; the client sent meanwhile.
        tokio::time::sleep(3 * idle).await;
        tx.send(Ok(Bytes::from_static(b"b"))).await.unwrap();
        assert_eq!(&body.next().await.unwrap().unwrap()[..], b"b");
        // Data that arrives within the timeout keeps the body alive.
        let sender = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(idle / 2).await;
            sender.send(Ok(Bytes::from_static(b"c"))).await.unwrap();
        });
        assert_eq!(&body.next().await.unwrap().unwrap()[..], b"c");
        // Then nothing comes: the body fails once it has waited the timeout, and ends.
        let started = std::time::Instant::now();
        let err = body.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= idle, "{:?}", started.elapsed());
        assert!(body.next().await.is_none());
        drop(tx);
    }
}
