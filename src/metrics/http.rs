//! A very small HTTP/1.1 server for the metrics and probe endpoints: GET (and HEAD) of a path,
//! one request per connection. Prometheus and kubelet's probes need nothing more, and a full
//! HTTP stack would be most of the daemon's dependencies for three URLs.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The longest request head accepted (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer: status code, content type, body.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn not_found(known: &[&str]) -> Reply {
        Reply::text(404, format!("not found; try {}\n", known.join(", ")))
    }
}

/// What answers a path.
pub type Handler = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// Binds `address` (a refusal names it, for the command's one-line error).
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("listen on {address}: {e}")))
}

/// Serves `handler` on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, handler: Handler, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, handler).await {
                            tracing::debug!(error = %e, "HTTP request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn answer(mut stream: TcpStream, handler: Handler) -> std::io::Result<()> {
    let head = tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    let reply = match parse_request_line(&head) {
        Ok((method, path)) => {
            let reply = handler(path).await;
            (method, reply)
        }
        Err(reply) => ("GET", reply),
    };
    let (method, reply) = reply;
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(reply.body.as_bytes());
    }
    tokio::time::timeout(IO_TIMEOUT, stream.write_all(&out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "answer timed out"))??;
    stream.shutdown().await
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// `(method, path without query)` of a GET or HEAD; anything else is answered with an error.
fn parse_request_line(head: &str) -> Result<(&'static str, String), Reply> {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(Reply::text(400, "bad request line\n"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Reply::text(400, "HTTP/1.x only\n"));
    }
    let method = match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        _ => return Err(Reply::text(405, "only GET and HEAD\n")),
    };
    let path = target.split('?').next().unwrap_or_default().to_string();
    Ok((method, path))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap(),
            ("GET", "/metrics".to_string())
        );
        assert_eq!(
            parse_request_line("HEAD /ready HTTP/1.0\r\n\r\n").unwrap(),
            ("HEAD", "/ready".to_string())
        );
        assert_eq!(
            parse_request_line("POST /x HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .status,
            405
        );
        assert_eq!(parse_request_line("\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(
            parse_request_line("GET / SPDY/3\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
    }

    #[tokio::test]
    async fn serves_a_path() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|path| {
            Box::pin(async move {
                if path == "/hello" {
                    Reply::text(200, "hi\n")
                } else {
                    Reply::not_found(&["/hello"])
                }
            })
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, handler, async {
            let _ = stopped.await;
        }));
        for (path, expect) in [
            ("/hello", "HTTP/1.1 200 OK"),
            ("/other", "HTTP/1.1 404 Not Found"),
        ] {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with(expect), "{answer}");
            if path == "/hello" {
                assert!(answer.ends_with("\r\n\r\nhi\n"), "{answer}");
            }
        }
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
