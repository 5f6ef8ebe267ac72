//! The blob backend the tests run against, and the S3 test server.
//!
//! Every test runs against the backend `STOWAGE_TEST_BACKEND` names, `fs` (the default) or
//! `s3`; `scripts/test` runs the suite once with each. For `s3` the harness starts one S3
//! server per test binary on 127.0.0.1 (moto's `moto.server`, from PyPI, run by
//! `$STOWAGE_TEST_PYTHON`, default `python3`; `scripts/test` installs it) and gives each
//! `TestServer` a bucket of its own. A missing S3 server is a test failure, never a skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

/// The blob backend a test server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Fs,
    S3,
}

/// S3 part size the tests use: S3's minimum, so that small test blobs span several parts.
pub const S3_PART_SIZE: usize = 5 * 1024 * 1024;

/// The backend selected by `STOWAGE_TEST_BACKEND` (`fs` unless it says `s3`).
pub fn backend() -> Backend {
    match std::env::var("STOWAGE_TEST_BACKEND").as_deref() {
        Ok("s3") => Backend::S3,
        Ok("fs") | Ok("") | Err(_) => Backend::Fs,
        Ok(other) => panic!("STOWAGE_TEST_BACKEND must be fs or s3, not {other:?}"),
    }
}

/// The S3 server shared by this test binary: `127.0.0.1:PORT`.
pub fn s3_server() -> &'static str {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER.get_or_init(start_s3_server)
}

/// Starts `python -m moto.server` on a free loopback port, from a thread that lives as long as
/// the test binary: the server gets SIGKILL when the test process exits (PR_SET_PDEATHSIG).
fn start_s3_server() -> String {
    let python = std::env::var("STOWAGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(format!("cannot run {python} -m moto.server: {e}")));
                return;
            }
        };
        let Some(stderr) = child.stderr.take() else {
            let _ = tx.send(Err("no stderr from moto.server".to_string()));
            return;
        };
        let log = std::env::var_os("TEST_S3_LOG").is_some();
        let mut ready = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("Running on http://")
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(Ok(()));
            }
            if log {
                eprintln!("moto: {line}");
            }
        }
        if let Some(tx) = ready.take() {
            let _ = tx.send(Err(format!("{python} -m moto.server exited before it listened")));
        }
        let _ = child.wait();
        // This thread is the server's parent for PR_SET_PDEATHSIG: keep it for the process.
        loop {
            std::thread::park();
        }
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(())) => format!("127.0.0.1:{port}"),
        Ok(Err(e)) => panic!("S3 test server: {e} (scripts/test installs moto[server])"),
        Err(_) => panic!("S3 test server (moto) did not start within 120 s"),
    }
}

/// One plain HTTP/1.1 request to the S3 test server (moto accepts unsigned requests);
/// returns the status and body.
pub fn s3_request(method: &str, path: &str) -> (u16, String) {
    let host = s3_server();
    let mut stream = std::net::TcpStream::connect(host).expect("connect to the S3 test server");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send to the S3 test server");
    let mut resp = String::new();
    stream.read_to_string(&mut resp).expect("read from the S3 test server");
    let status = resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Puts (`Some(data)`) or deletes (`None`) the object `key` in `bucket` through the S3 API,
/// signed with the tests' credentials: moto refuses unsigned writes over existing objects.
/// Runs on a thread of its own, so that it can be called from async tests.
pub fn s3_write_object(bucket: &str, key: &str, data: Option<Vec<u8>>) {
    use object_store::ObjectStoreExt as _;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(format!("http://{}", s3_server()))
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id("stowage-test")
        .with_secret_access_key("stowage-test-secret")
        .build()
        .expect("S3 client");
    let path = object_store::path::Path::from(key);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    match data {
                        Some(data) => store.put(&path, data.into()).await.map(|_| ()),
                        None => store.delete(&path).await,
                    }
                })
                .unwrap_or_else(|e| panic!("S3 write of {key}: {e}"));
            })
            .join()
            .expect("S3 write thread");
    });
}

/// The keys under `prefix` in `bucket` (one listing page, up to 1,000 keys).
pub fn bucket_keys(bucket: &str, prefix: &str) -> Vec<String> {
    let (status, body) = s3_request("GET", &format!("/{bucket}?list-type=2&prefix={prefix}"));
    assert_eq!(status, 200, "list {prefix}: {body}");
    body.split("<Key>")
        .skip(1)
        .filter_map(|k| k.split_once("</Key>").map(|(k, _)| k.to_owned()))
        .collect()
}

/// Creates a fresh bucket on the S3 test server and returns its name.
pub fn new_bucket() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "stowage-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let (status, body) = s3_request("PUT", &format!("/{name}"));
    assert_eq!(status, 200, "create bucket {name}: {body}");
    name
}

/// The environment that puts a server's blobs in `bucket` on the S3 test server.
pub fn s3_envs(bucket: &str) -> Vec<(String, String)> {
    [
        ("STOWAGE_STORAGE__BACKEND", "s3".to_string()),
        ("STOWAGE_STORAGE__S3__BUCKET", bucket.to_string()),
        ("STOWAGE_STORAGE__S3__ENDPOINT", format!("http://{}", s3_server())),
        ("STOWAGE_STORAGE__S3__PATH_STYLE", "true".to_string()),
        ("STOWAGE_STORAGE__PART_SIZE", S3_PART_SIZE.to_string()),
        ("AWS_ACCESS_KEY_ID", "stowage-test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "stowage-test-secret".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Whether anything is staged under `uploads/` in `bucket`: an object or a multipart upload.
pub fn bucket_has_uploads(bucket: &str) -> bool {
    let (_, parts) = s3_request("GET", &format!("/{bucket}?uploads"));
    let (_, objects) = s3_request("GET", &format!("/{bucket}?list-type=2&prefix=uploads/"));
    parts.contains("<Upload>") || objects.contains("<Contents>")
}
