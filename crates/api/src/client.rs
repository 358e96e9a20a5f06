//! A client of the service API over its Unix socket: one HTTP/1.1 connection per call, JSON in
//! and out, NDJSON streams for long operations, byte streams for archives, and HTTP upgrades
//! for interactive sessions.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use http_body_util::{BodyExt, BodyStream, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixStream;

use crate::{API_PREFIX, ApiError, ErrorKind, ExitCode};

/// Body type of requests: a whole buffer or a stream of chunks.
pub type RequestBody = BoxBody<Bytes, std::io::Error>;

/// Why a call to the service failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("the container service is not running (no answer on {})", socket.display())]
    NotRunning {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The socket exists but the caller may not connect to it.
    #[error("cannot connect to the container service at {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The service answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The HTTP exchange itself failed.
    #[error("talking to the container service")]
    Http(#[from] hyper::Error),
    /// The service's answer was not what this client understands.
    #[error("unexpected answer from the container service")]
    Decode(#[source] serde_json::Error),
    /// Reading or writing a streamed body failed.
    #[error("streaming data to or from the container service")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The API error kind, when the service answered with one.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api(e) => Some(e.kind),
            _ => None,
        }
    }

    /// What the CLI exits with for this failure, from [`ExitCode`]'s table. A stream or an
    /// answer that breaks part-way has no code of its own.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ClientError::NotRunning { source, .. } | ClientError::Connect { source, .. } => {
                ExitCode::for_unreachable_service(source)
            }
            ClientError::Api(e) => e.kind.exit_code(),
            ClientError::Http(_) | ClientError::Decode(_) | ClientError::Io(_) => ExitCode::Failure,
        }
    }
}

/// A client bound to one service socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// Wraps a buffer as a request body.
pub fn full_body(bytes: impl Into<Bytes>) -> RequestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Wraps a stream of chunks as a request body.
pub fn stream_body<S>(stream: S) -> RequestBody
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static,
{
    BodyExt::boxed(StreamBody::new(stream.map_ok(Frame::data)))
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request on a fresh connection and returns the raw response. The connection
    /// task keeps running for upgrades.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: RequestBody,
        upgrade: bool,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|source| {
            use std::io::ErrorKind as K;
            match source.kind() {
                K::NotFound | K::ConnectionRefused => ClientError::NotRunning {
                    socket: self.socket.clone(),
                    source,
                },
                _ => ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                },
            }
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(HeardOut::new(stream, !upgrade)))
                .await?;
        tokio::spawn(async move {
            // Errors here surface on the response side; nothing to add.
            let _ = conn.with_upgrades().await;
        });
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://container{API_PREFIX}{path}"))
            .header(hyper::header::HOST, "container");
        if let Some(ct) = content_type {
            builder = builder.header(hyper::header::CONTENT_TYPE, ct);
        }
        if upgrade {
            builder = builder
                .header(hyper::header::CONNECTION, "upgrade")
                .header(hyper::header::UPGRADE, "container-exec");
        }
        let request = builder
            .body(body)
            .expect("a request built from a valid path and fixed headers");
        let response = sender.send_request(request).await?;
        Ok(response)
    }

    /// Turns a non-success response into its `ApiError`.
    async fn check(response: Response<Incoming>) -> Result<Response<Incoming>, ClientError> {
        let status = response.status();
        if status.is_success() || status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(response);
        }
        let bytes = response.into_body().collect().await?.to_bytes();
        let error = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
            ApiError::new(
                ErrorKind::from_http_status(status.as_u16()),
                format!(
                    "the service answered {status}: {}",
                    String::from_utf8_lossy(&bytes).trim()
                ),
            )
        });
        Err(ClientError::Api(error))
    }

    /// A JSON call: `body` serialised when given, the answer parsed as `R`.
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let response = self.call_raw(method, path, body).await?;
        let bytes = response.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    /// A JSON call whose answer is read by the caller (streams, archives).
    pub async fn call_raw<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Response<Incoming>, ClientError> {
        let (ct, body) = match body {
            Some(b) => (
                Some("application/json"),
                full_body(serde_json::to_vec(b).map_err(ClientError::Decode)?),
            ),
            None => (None, full_body(Bytes::new())),
        };
        Self::check(self.send(method, path, ct, body, false).await?).await
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call::<(), R>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call::<(), R>(Method::DELETE, path, None).await
    }

    /// Uploads a byte stream (an archive) and parses the JSON answer.
    pub async fn upload<R: DeserializeOwned>(
        &self,
        path: &str,
        body: RequestBody,
    ) -> Result<R, ClientError> {
        let response = self
            .send(
                Method::POST,
                path,
                Some("application/octet-stream"),
                body,
                false,
            )
            .await?;
        let bytes = Self::check(response)
            .await?
            .into_body()
            .collect()
            .await?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    /// Opens an upgraded connection (interactive sessions). The request body is JSON.
    pub async fn upgrade<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        let body = full_body(serde_json::to_vec(body).map_err(ClientError::Decode)?);
        let response = self
            .send(Method::POST, path, Some("application/json"), body, true)
            .await?;
        let response = Self::check(response).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(ClientError::Api(ApiError::internal(format!(
                "the service did not switch protocols (answered {})",
                response.status()
            ))));
        }
        Ok(TokioIo::new(hyper::upgrade::on(response).await?))
    }
}

/// Reads a response body as a stream of chunks.
pub fn body_stream(response: Response<Incoming>) -> impl Stream<Item = std::io::Result<Bytes>> {
    BodyStream::new(response.into_body()).filter_map(|frame| async move {
        match frame {
            Ok(frame) => frame.into_data().ok().map(Ok),
            // The service went away mid-answer (stopped or killed): say so, not how.
            Err(e) if e.is_incomplete_message() => Some(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the service closed the connection before its answer was complete (did it stop? see `container system status`); run the command again",
            ))),
            Err(e) => Some(Err(std::io::Error::other(e))),
        }
    })
}

/// Reads a response body as newline-delimited JSON values of type `T`.
pub fn ndjson<T: DeserializeOwned + Send + 'static>(
    response: Response<Incoming>,
) -> impl Stream<Item = Result<T, ClientError>> {
    let reader = tokio_util_reader(body_stream(response));
    let lines = tokio::io::BufReader::new(reader).lines();
    futures::stream::unfold(lines, |mut lines| async move {
        loop {
            match lines.next_line().await {
                Ok(Some(line)) if line.trim().is_empty() => continue,
                Ok(Some(line)) => {
                    return Some((
                        serde_json::from_str(&line).map_err(ClientError::Decode),
                        lines,
                    ));
                }
                Ok(None) => return None,
                Err(e) => return Some((Err(ClientError::Io(e)), lines)),
            }
        }
    })
}

/// A connection to the service on which a write the service no longer reads is dropped
/// instead of failing. The service may answer before it has read a whole request body (an
/// upload over a size limit is refused part-way, then the connection closed) and its answer
/// waits in the socket; hyper, still sending the body, would report the broken pipe and lose
/// that answer. With the failed write taken as done, hyper goes on to read the answer, or
/// the end of the connection if there is none. (Hyper's HTTP/1 client has no
/// `Expect: 100-continue`, which would ask before sending.) An upgraded connection (an
/// interactive session) keeps its write errors: there they mean the session is over.
struct HeardOut {
    stream: UnixStream,
    drop_unheard: bool,
    closed: bool,
}

impl HeardOut {
    fn new(stream: UnixStream, drop_unheard: bool) -> Self {
        Self {
            stream,
            drop_unheard,
            closed: false,
        }
    }

    fn peer_closed(e: &std::io::Error) -> bool {
        use std::io::ErrorKind as K;
        matches!(e.kind(), K::BrokenPipe | K::ConnectionReset)
    }
}

impl tokio::io::AsyncRead for HeardOut {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HeardOut {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        if self.closed {
            return Poll::Ready(Ok(buf.len()));
        }
        match std::pin::Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Ready(Err(e)) if self.drop_unheard && Self::peer_closed(&e) => {
                self.closed = true;
                Poll::Ready(Ok(buf.len()))
            }
            other => other,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.closed {
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.closed {
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Adapts a chunk stream to `AsyncRead`.
pub fn tokio_util_reader(
    stream: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
) -> impl tokio::io::AsyncRead + Send + Unpin {
    tokio_util::io::StreamReader::new(Box::pin(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_failures_exit_with_the_table_s_codes() {
        let io = |kind| std::io::Error::from(kind);
        let socket = PathBuf::from("/run/container/apiserver.sock");
        let cases = [
            (
                ClientError::NotRunning {
                    socket: socket.clone(),
                    source: io(std::io::ErrorKind::ConnectionRefused),
                },
                ExitCode::ServiceUnavailable,
            ),
            (
                ClientError::Connect {
                    socket,
                    source: io(std::io::ErrorKind::PermissionDenied),
                },
                ExitCode::PermissionDenied,
            ),
            (
                ClientError::Api(ApiError::new(ErrorKind::AlreadyExists, "taken")),
                ExitCode::Conflict,
            ),
            (
                ClientError::Io(io(std::io::ErrorKind::BrokenPipe)),
                ExitCode::Failure,
            ),
        ];
        for (error, exit) in cases {
            assert_eq!(error.exit_code(), exit, "{error}");
        }
    }

    /// A service that refuses an upload part-way: reads the head and a little of the body,
    /// answers, and closes with the rest unread (as the service does past a size limit).
    fn refusing_service(socket: &Path) -> std::thread::JoinHandle<()> {
        use std::io::{Read, Write};
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = vec![0; 64 * 1024];
            let mut read = 0;
            while read < 256 * 1024 {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
            let body = serde_json::to_vec(&ApiError::new(
                ErrorKind::PermissionDenied,
                "the archive is larger than 1 MiB",
            ))
            .unwrap();
            let head = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).unwrap();
            conn.write_all(&body).unwrap();
        })
    }

    #[tokio::test]
    async fn an_upload_refused_part_way_reports_the_refusal_not_a_broken_pipe() {
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("api.sock");
            let service = refusing_service(&socket);
            // 64 MiB in 1 MiB chunks, far more than the service reads before it answers.
            let chunks = (0..64).map(|_| Ok(Bytes::from(vec![7u8; 1 << 20])));
            let body = stream_body(futures::stream::iter(chunks));
            let err = Client::new(&socket)
                .upload::<serde_json::Value>("/images/load", body)
                .await
                .unwrap_err();
            service.join().unwrap();
            assert_eq!(
                err.kind(),
                Some(ErrorKind::PermissionDenied),
                "round {round}: {err:?}"
            );
            assert!(err.to_string().contains("larger than 1 MiB"), "{err}");
        }
    }
}
