//! Streaming a log file to a client: the last N lines, then (with follow) what is appended,
//! until the client goes away.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// The last `lines` lines of `text` (all of it when `None`).
pub fn last_lines(text: &[u8], lines: Option<usize>) -> &[u8] {
    let Some(n) = lines else { return text };
    if n == 0 {
        return &text[text.len()..];
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    text
}

/// Streams the file; a missing file is an empty log (the machine never booted).
pub fn stream(
    path: PathBuf,
    lines: Option<usize>,
    follow: bool,
) -> impl Stream<Item = std::io::Result<Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(16);
    tokio::spawn(async move {
        let initial = tokio::fs::read(&path).await.unwrap_or_default();
        let mut offset = initial.len() as u64;
        let first = Bytes::copy_from_slice(last_lines(&initial, lines));
        if !first.is_empty() && tx.send(Ok(first)).await.is_err() {
            return;
        }
        if !follow {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if tx.is_closed() {
                return;
            }
            let Ok(mut file) = tokio::fs::File::open(&path).await else {
                continue;
            };
            let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
            if len < offset {
                // Rotated or truncated (a new boot): start over.
                offset = 0;
            }
            if len == offset {
                continue;
            }
            if file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
                continue;
            }
            let mut buf = Vec::new();
            if file.read_to_end(&mut buf).await.is_ok() {
                offset += buf.len() as u64;
                if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut rx = rx;
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::last_lines;

    #[test]
    fn takes_the_last_lines() {
        let text = b"a\nb\nc\n";
        assert_eq!(last_lines(text, Some(2)), b"b\nc\n");
        assert_eq!(last_lines(text, Some(5)), text);
        assert_eq!(last_lines(text, None), text);
        assert_eq!(last_lines(text, Some(0)), b"");
        assert_eq!(last_lines(b"x\ny", Some(1)), b"y");
    }
}
