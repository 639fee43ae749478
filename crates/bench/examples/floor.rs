//! The floor under a single-entity GET's server CPU on this machine: servers that do nothing
//! but answer every request with a fixed body, so what they spend per request is the kernel's
//! part (one read, one write on a loopback socket) and the runtime's — what any server pays here
//! before it looks anything up. `scripts/wrk-reads.sh --floor` drives them with wrk beside
//! Quiver's GET and reads their CPU from `/proc`.
//!
//! ```sh
//! cargo run --release -p quiver-bench --example floor -- raw 127.0.0.1:8181 3000
//! cargo run --release -p quiver-bench --example floor -- hyper 127.0.0.1:8181 3000
//! ```
//!
//! `raw`: tokio alone — reads until a request's blank line, writes a prepared HTTP/1.1 reply
//! (no parsing, no routing, no allocation per request; requests with a body are not expected).
//! `hyper`: the HTTP stack Quiver's surface is built on, answering every request with the same
//! body — plain HTTP/1, lighter than Quiver's listener (hyper-util's HTTP/1-or-2 builder with
//! a timer). Both on a tokio runtime of as many workers as cores, as `quiver serve` runs.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head the raw server takes (wrk's GETs are ~60 bytes).
const HEAD_MAX: usize = 8192;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, addr, bytes] = args.as_slice() else {
        return Err("usage: floor raw|hyper ADDR BODY_BYTES".into());
    };
    if !matches!(mode.as_str(), "raw" | "hyper") {
        return Err(format!("unknown mode {mode} (raw or hyper)").into());
    }
    let body = Bytes::from(vec![b'x'; bytes.parse()?]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(addr.as_str()).await?;
        loop {
            let (socket, _) = listener.accept().await?;
            socket.set_nodelay(true)?;
            let body = body.clone();
            match mode.as_str() {
                "raw" => tokio::spawn(raw(socket, body)),
                _ => tokio::spawn(hyper_conn(socket, body)),
            };
        }
    })
}

/// Answers each request head (up to its blank line) with the prepared reply; ends the
/// connection on EOF, an error or a head over [`HEAD_MAX`].
async fn raw(mut socket: TcpStream, body: Bytes) {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let reply = [head.as_bytes(), &body].concat();
    let mut buf = vec![0u8; HEAD_MAX];
    let mut filled = 0;
    loop {
        match socket.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
        // Every complete head read gets one reply (wrk and the scripts' curl send one request
        // at a time and wait for its answer).
        while let Some(end) = memchr::memmem::find(&buf[..filled], b"\r\n\r\n") {
            if socket.write_all(&reply).await.is_err() {
                return;
            }
            buf.copy_within(end + 4..filled, 0);
            filled -= end + 4;
        }
        if filled == buf.len() {
            return;
        }
    }
}

async fn hyper_conn(socket: TcpStream, body: Bytes) {
    let service = service_fn(move |_: Request<Incoming>| {
        let body = body.clone();
        async move {
            let reply = Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(body))
                .expect("a fixed, valid response");
            Ok::<_, Infallible>(reply)
        }
    });
    // A connection's error is the client's business here (wrk closes at the end of a run).
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(socket), service)
        .await;
}
