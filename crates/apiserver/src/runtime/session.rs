//! Sessions with a machine's agent on behalf of a client: `run` relays the client's session
//! frames to an agent exec session and back; `cp` streams tar data through the agent's copy
//! requests. The agent is reached only through [`AgentClient`].

use std::path::Path;

use container_agent_proto::client::{AgentClient, ExecEvent, ExitStatus as AgentExit};
use container_agent_proto::{ExecRequest, PORT, ProtoError};
use container_api::ApiError;
use container_api::session::{ExitStatus, Frame as ClientFrame};
use tokio::io::{AsyncRead, AsyncWriteExt};

use super::RuntimeError;

/// Byte stream of a client's upgraded connection.
pub trait ClientStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> ClientStream for T {}

/// The runtime's error for an exec that failed: the agent's refusal, else the session.
fn exec_failed(e: ProtoError) -> RuntimeError {
    match e {
        ProtoError::Agent { message, .. } => RuntimeError::CommandRefused { message },
        e => RuntimeError::Agent(e),
    }
}

/// The frames that end a client's session with a process that could not start (not found,
/// not executable): Docker's convention, the tool reports and the exit code says 126 or 127.
async fn refused(client: &mut (impl tokio::io::AsyncWrite + Unpin), message: String, code: i32) {
    let _ = ClientFrame::Stderr(format!("{message}\n").into_bytes())
        .write(client)
        .await;
    let exit = ExitStatus {
        code: Some(code),
        signal: None,
    };
    let _ = ClientFrame::Exit(exit).write(client).await;
}

/// Runs a process and relays frames between the client and the agent until it ends; with
/// `detach`, the client is let go once the process started.
pub async fn exec(
    vsock: &Path,
    request: ExecRequest,
    detach: bool,
    mut client: impl ClientStream + 'static,
) -> Result<(), RuntimeError> {
    let started = async { AgentClient::connect(vsock, PORT).await?.exec(request).await };
    let session = match started.await {
        Ok(session) => session,
        Err(ProtoError::Agent {
            message,
            code: Some(code),
        }) => {
            refused(&mut client, message, code).await;
            return Ok(());
        }
        Err(e) => {
            let e = exec_failed(e);
            let _ = ClientFrame::Error(ApiError::from(&e))
                .write(&mut client)
                .await;
            return Err(e);
        }
    };
    let pid = session.pid();
    let (mut input, mut events) = session.split();
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let mut client_open = ClientFrame::Started { pid }
        .write(&mut client_w)
        .await
        .is_ok();
    if detach {
        // The client leaves; the session stays to drain output until the process ends.
        let _ = client_w.shutdown().await;
        client_open = false;
    }

    // Client → agent, until the client goes away or the process ends.
    let relay_input = tokio::spawn(async move {
        while let Ok(Some(frame)) = ClientFrame::read(&mut client_r).await {
            let sent = match frame {
                ClientFrame::Stdin(b) => input.write_stdin(&b).await,
                ClientFrame::StdinEof => input.close_stdin().await,
                ClientFrame::Resize { rows, cols } => input.resize(rows, cols).await,
                ClientFrame::Signal(signal) => input.signal(signal).await,
                _ => continue,
            };
            if sent.is_err() {
                break;
            }
        }
        // Returned, not dropped, so it lives as long as the session: dropping it shuts the
        // session's input side, and the agent would end the process's input (a terminal's
        // too) although a client that left (detach) expects the process to run on.
        input
    });
    let result = loop {
        let out = match events.next().await {
            Ok(ExecEvent::Stdout(b)) => ClientFrame::Stdout(b),
            Ok(ExecEvent::Stderr(b)) => ClientFrame::Stderr(b),
            Ok(ExecEvent::Exit(status)) => {
                let status = match status {
                    AgentExit::Code(c) => ExitStatus {
                        code: Some(c),
                        signal: None,
                    },
                    AgentExit::Signal(s) => ExitStatus {
                        code: None,
                        signal: Some(s),
                    },
                };
                if client_open {
                    let _ = ClientFrame::Exit(status).write(&mut client_w).await;
                }
                break Ok(());
            }
            Err(ProtoError::Agent {
                message,
                code: Some(code),
            }) => {
                if client_open {
                    refused(&mut client_w, message, code).await;
                }
                break Ok(());
            }
            Err(e) => {
                let e = exec_failed(e);
                if client_open {
                    let _ = ClientFrame::Error(ApiError::from(&e))
                        .write(&mut client_w)
                        .await;
                }
                break Err(e);
            }
        };
        if client_open && out.write(&mut client_w).await.is_err() {
            client_open = false;
        }
    };
    relay_input.abort();
    result
}

/// Streams a tar into the machine at `path`.
pub async fn copy_in(
    vsock: &Path,
    path: &str,
    tar: Box<dyn AsyncRead + Send + Unpin>,
) -> Result<(), RuntimeError> {
    let agent = AgentClient::connect(vsock, PORT)
        .await
        .map_err(RuntimeError::Agent)?;
    agent.copy_in(path, tar).await.map_err(|e| match e {
        ProtoError::Input(e) => RuntimeError::ReadingArchive(e),
        ProtoError::Agent { message, .. } => RuntimeError::CopyInRefused { message },
        e => RuntimeError::Agent(e),
    })
}

/// A tar stream of `path` in the machine; errors before the first byte are the runtime's, a
/// failure later is an error of the stream (never its end).
pub async fn copy_out(
    vsock: &Path,
    path: &str,
) -> Result<Box<dyn AsyncRead + Send + Unpin>, RuntimeError> {
    let agent = AgentClient::connect(vsock, PORT)
        .await
        .map_err(RuntimeError::Agent)?;
    match agent.copy_out(path).await {
        Ok(tar) => Ok(Box::new(tar)),
        Err(ProtoError::Agent { message, .. }) => Err(RuntimeError::CopyOutRefused { message }),
        Err(e) => Err(RuntimeError::Agent(e)),
    }
}

/// A connection to TCP `port` on the machine's loopback, through the agent: its raw bytes.
pub async fn connect(vsock: &Path, port: u16) -> Result<tokio::net::UnixStream, RuntimeError> {
    let agent = AgentClient::connect(vsock, PORT)
        .await
        .map_err(RuntimeError::Agent)?;
    match agent.forward_raw(port).await {
        Ok(stream) => Ok(stream),
        Err(ProtoError::Agent { message, .. }) => Err(RuntimeError::ConnectRefused { message }),
        Err(e) => Err(RuntimeError::Agent(e)),
    }
}

/// A tar stream of the machine's root filesystem alone, for a commit; errors as
/// [`copy_out`]'s.
pub async fn copy_root(vsock: &Path) -> Result<Box<dyn AsyncRead + Send + Unpin>, RuntimeError> {
    let agent = AgentClient::connect(vsock, PORT)
        .await
        .map_err(RuntimeError::Agent)?;
    match agent.copy_root().await {
        Ok(tar) => Ok(Box::new(tar)),
        Err(ProtoError::Agent { message, .. }) => Err(RuntimeError::CopyOutRefused { message }),
        Err(e) => Err(RuntimeError::Agent(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use container_agent_proto::host::{read, send, write};
    use container_agent_proto::{Frame, Kind, Message};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};

    /// A fake machine: vhost-device-vsock's hybrid handshake (`CONNECT <port>` → `OK <n>`),
    /// then an agent that greets and plays `agent` for the session.
    fn fake_agent<F, Fut>(dir: &Path, agent: F) -> std::path::PathBuf
    where
        F: Fn(tokio::net::UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let path = dir.join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mut reader = tokio::io::BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                assert_eq!(line, format!("CONNECT {PORT}\n"));
                let mut s = reader.into_inner();
                s.write_all(b"OK 1\n").await.unwrap();
                let Some(Frame::Message(Message::Hello { version })) = read(&mut s).await.unwrap()
                else {
                    panic!("no hello")
                };
                let hello = Message::HelloOk {
                    version,
                    agent: "test".into(),
                    half_close: true,
                };
                send(&mut s, hello).await.unwrap();
                agent(s).await;
            }
        });
        path
    }

    /// Runs `argv` through [`exec`] as a client that sends `input` then ends its input;
    /// everything the client got back.
    async fn run(vsock: &Path, argv: &str, input: &[u8]) -> Vec<ClientFrame> {
        let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
        let request = ExecRequest {
            argv: vec![argv.into()],
            arg0: None,
            env: Vec::new(),
            cwd: "/".into(),
            uid: Some(0),
            gid: None,
            groups: None,
            user: None,
            tty: false,
            rows: 0,
            cols: 0,
            ssh_agent: false,
        };
        let vsock = vsock.to_path_buf();
        let session = tokio::spawn(async move { exec(&vsock, request, false, theirs).await });
        ClientFrame::Stdin(input.to_vec())
            .write(&mut ours)
            .await
            .unwrap();
        ClientFrame::StdinEof.write(&mut ours).await.unwrap();
        let mut got = Vec::new();
        while let Ok(Some(f)) = ClientFrame::read(&mut ours).await {
            got.push(f);
        }
        session.await.unwrap().unwrap();
        got
    }

    #[tokio::test]
    async fn a_run_relays_input_output_and_exit_and_a_missing_command_exits_127() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = fake_agent(dir.path(), |mut s| async move {
            let Some(Frame::Message(Message::Exec(req))) = read(&mut s).await.unwrap() else {
                panic!("no exec")
            };
            if req.argv[0] == "missing" {
                let message = "missing: not found".to_string();
                let refused = Message::Error {
                    message,
                    code: Some(127),
                };
                send(&mut s, refused).await.unwrap();
                return;
            }
            send(&mut s, Message::Started { pid: 7 }).await.unwrap();
            while let Some(Frame::Data(Kind::Stdin, b)) = read(&mut s).await.unwrap() {
                write(&mut s, &Frame::Data(Kind::Stdout, b)).await.unwrap();
            }
            let exit = Message::Exit {
                code: Some(3),
                signal: None,
            };
            send(&mut s, exit).await.unwrap();
        });
        let exit = |code| {
            ClientFrame::Exit(ExitStatus {
                code: Some(code),
                signal: None,
            })
        };
        assert_eq!(
            run(&vsock, "cat", b"hello").await,
            [
                ClientFrame::Started { pid: 7 },
                ClientFrame::Stdout(b"hello".to_vec()),
                exit(3)
            ]
        );
        assert_eq!(
            run(&vsock, "missing", b"").await,
            [
                ClientFrame::Stderr(b"missing: not found\n".to_vec()),
                exit(127)
            ]
        );
    }

    #[tokio::test]
    async fn a_copy_out_the_agent_fails_part_way_is_an_error_not_a_short_archive() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = fake_agent(dir.path(), |mut s| async move {
            let Some(Frame::Message(Message::CopyOut { .. })) = read(&mut s).await.unwrap() else {
                panic!("no copy out")
            };
            let data = Frame::Data(Kind::Data, b"the first half of an archive".to_vec());
            write(&mut s, &data).await.unwrap();
            let message = "reading /srv/big: Input/output error (os error 5)".to_string();
            let failed = Message::Error {
                message,
                code: None,
            };
            send(&mut s, failed).await.unwrap();
        });
        let mut tar = copy_out(&vsock, "/srv/big").await.unwrap();
        let mut got = Vec::new();
        let err = tar
            .read_to_end(&mut got)
            .await
            .expect_err("the archive ended as if complete");
        assert!(err.to_string().contains("Input/output error"), "{err}");
        assert_eq!(got, b"the first half of an archive");
    }
}
