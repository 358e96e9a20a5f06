//! Sessions with a machine's agent on behalf of a client: `run` relays the client's session
//! frames to the agent's protocol and back; `cp` streams tar data in agent data frames.

use std::path::Path;

use container_agent_proto::host::{connect, read, send, write};
use container_agent_proto::{ExecRequest, Frame, Kind, Message, PORT};
use container_api::session::{ExitStatus, Frame as ClientFrame};
use container_api::{ApiError, ErrorKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::core::ports::{ClientStream, ExecSpec, ExecUser};

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        format!("talking to the guest agent: {e}"),
    )
}

/// Runs a process and relays frames between the client and the agent until it ends.
pub async fn exec(
    vsock: &Path,
    spec: ExecSpec,
    mut client: Box<dyn ClientStream>,
) -> Result<(), ApiError> {
    let agent = match connect(vsock, PORT).await {
        Ok(a) => a,
        Err(e) => {
            let e = unavailable(e);
            let _ = ClientFrame::Error(e.clone()).write(&mut client).await;
            return Err(e);
        }
    };
    let (uid, gid, user) = match &spec.user {
        ExecUser::Ids { uid, gid } => (Some(*uid), *gid, None),
        ExecUser::Name(n) => (None, None, Some(n.clone())),
    };
    let request = ExecRequest {
        argv: spec.argv.clone(),
        arg0: spec.arg0.clone(),
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
        uid,
        gid,
        groups: spec.groups.clone(),
        user,
        tty: spec.tty,
        rows: spec.rows,
        cols: spec.cols,
    };
    let (mut agent_r, mut agent_w) = tokio::io::split(agent);
    send(&mut agent_w, Message::Exec(request))
        .await
        .map_err(unavailable)?;
    let (mut client_r, mut client_w) = tokio::io::split(client);

    // Client → agent, until the client goes away or the process ends.
    let input = tokio::spawn(async move {
        while let Ok(Some(frame)) = ClientFrame::read(&mut client_r).await {
            let out = match frame {
                ClientFrame::Stdin(b) => Frame::Data(Kind::Stdin, b),
                ClientFrame::StdinEof => Frame::Message(Message::StdinEof),
                ClientFrame::Resize { rows, cols } => {
                    Frame::Message(Message::Resize { rows, cols })
                }
                ClientFrame::Signal(signal) => Frame::Message(Message::Signal { signal }),
                _ => continue,
            };
            if write(&mut agent_w, &out).await.is_err() {
                break;
            }
        }
    });
    let detach = spec.detach;
    let mut client_open = true;
    let result = loop {
        let frame = match read(&mut agent_r).await {
            Ok(Some(f)) => f,
            Ok(None) => break Err(unavailable("the agent closed the session")),
            Err(e) => break Err(unavailable(e)),
        };
        let out = match frame {
            Frame::Data(Kind::Stdout, b) => ClientFrame::Stdout(b),
            Frame::Data(Kind::Stderr, b) => ClientFrame::Stderr(b),
            Frame::Message(Message::Started { pid }) => ClientFrame::Started { pid },
            Frame::Message(Message::Exit { code, signal }) => {
                if client_open {
                    let _ = ClientFrame::Exit(ExitStatus { code, signal })
                        .write(&mut client_w)
                        .await;
                }
                break Ok(());
            }
            Frame::Message(Message::Error {
                message,
                code: Some(code),
            }) => {
                // Docker's convention: the tool reports, the exit code says 126 or 127.
                if client_open {
                    let _ = ClientFrame::Stderr(format!("{message}\n").into_bytes())
                        .write(&mut client_w)
                        .await;
                    let _ = ClientFrame::Exit(ExitStatus {
                        code: Some(code),
                        signal: None,
                    })
                    .write(&mut client_w)
                    .await;
                }
                break Ok(());
            }
            Frame::Message(Message::Error {
                message,
                code: None,
            }) => {
                let e = ApiError::invalid(message);
                if client_open {
                    let _ = ClientFrame::Error(e.clone()).write(&mut client_w).await;
                }
                break Err(e);
            }
            _ => continue,
        };
        let started = matches!(out, ClientFrame::Started { .. });
        if client_open && out.write(&mut client_w).await.is_err() {
            client_open = false;
        }
        if started && detach {
            // The client leaves; the session stays to drain output until the process ends.
            let _ = client_w.shutdown().await;
            client_open = false;
        }
    };
    input.abort();
    result
}

/// Streams a tar into the machine at `path`.
pub async fn copy_in(
    vsock: &Path,
    path: &str,
    mut tar: Box<dyn AsyncRead + Send + Unpin>,
) -> Result<(), ApiError> {
    let mut agent = connect(vsock, PORT).await.map_err(unavailable)?;
    send(
        &mut agent,
        Message::CopyIn {
            path: path.to_string(),
        },
    )
    .await
    .map_err(unavailable)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = tar
            .read(&mut buf)
            .await
            .map_err(|e| ApiError::invalid(format!("reading the archive: {e}")))?;
        if n == 0 {
            break;
        }
        write(&mut agent, &Frame::Data(Kind::Data, buf[..n].to_vec()))
            .await
            .map_err(unavailable)?;
    }
    send(&mut agent, Message::DataEof)
        .await
        .map_err(unavailable)?;
    match read(&mut agent).await.map_err(unavailable)? {
        Some(Frame::Message(Message::Done)) => Ok(()),
        Some(Frame::Message(Message::Error { message, .. })) => Err(ApiError::invalid(message)),
        other => Err(unavailable(format!("unexpected answer {other:?}"))),
    }
}

/// A tar stream of `path` in the machine; errors before the first byte are API errors.
pub async fn copy_out(
    vsock: &Path,
    path: &str,
) -> Result<Box<dyn AsyncRead + Send + Unpin>, ApiError> {
    let mut agent = connect(vsock, PORT).await.map_err(unavailable)?;
    send(
        &mut agent,
        Message::CopyOut {
            path: path.to_string(),
        },
    )
    .await
    .map_err(unavailable)?;
    let first = match read(&mut agent).await.map_err(unavailable)? {
        Some(Frame::Data(Kind::Data, b)) => Some(b),
        Some(Frame::Message(Message::DataEof)) => None,
        Some(Frame::Message(Message::Error { message, .. })) => {
            return Err(ApiError::not_found(message));
        }
        other => return Err(unavailable(format!("unexpected answer {other:?}"))),
    };
    let (mut tx, rx) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        if let Some(b) = first {
            if tx.write_all(&b).await.is_err() {
                return;
            }
            while let Ok(Some(Frame::Data(Kind::Data, b))) = read(&mut agent).await {
                if tx.write_all(&b).await.is_err() {
                    return;
                }
            }
        }
        let _ = tx.shutdown().await;
    });
    Ok(Box::new(rx))
}
