//! Streaming a log file to a client: the last N lines, then (with follow) what is appended,
//! until the client goes away. A log is written by a guest, which may write gigabytes: it is
//! never read whole into memory, only in chunks of [`CHUNK`], and the tail is found by
//! reading backwards from the end.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
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

/// The unit in which logs are read and sent.
pub const CHUNK: usize = 64 << 10;
/// The most [`read_tail`] reads back from the end, whatever the lines asked for.
pub const MAX_TAIL: u64 = 4 << 20;

/// The last `lines` lines of the file at `path`, reading backwards from its end in chunks and
/// never more than [`MAX_TAIL`] bytes (a longer tail is cut at its start). A missing file is
/// empty.
pub fn read_tail(path: &Path, lines: usize) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let mut start = len;
    let mut buf: Vec<u8> = Vec::new();
    // One newline more than lines asked for bounds them (the last may end the file).
    while start > 0 && len - start < MAX_TAIL {
        let step = (CHUNK as u64).min(start).min(MAX_TAIL - (len - start));
        start -= step;
        file.seek(std::io::SeekFrom::Start(start))?;
        let mut chunk = vec![0; step as usize];
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        if buf.iter().filter(|b| **b == b'\n').count() > lines {
            break;
        }
    }
    let keep = last_lines(&buf, Some(lines)).len();
    Ok(buf.split_off(buf.len() - keep))
}

/// Streams the file; a missing file is an empty log (the machine never booted).
pub fn stream(
    path: PathBuf,
    lines: Option<usize>,
    follow: bool,
) -> impl Stream<Item = std::io::Result<Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(16);
    tokio::spawn(async move {
        let mut offset = match lines {
            Some(n) => {
                let tail_path = path.clone();
                let (tail, len) = tokio::task::spawn_blocking(move || {
                    let len = std::fs::metadata(&tail_path).map_or(0, |m| m.len());
                    (read_tail(&tail_path, n).unwrap_or_default(), len)
                })
                .await
                .unwrap_or_default();
                if !tail.is_empty() && tx.send(Ok(Bytes::from(tail))).await.is_err() {
                    return;
                }
                len
            }
            None => 0,
        };
        // The whole log (no line count) is sent like what follows: chunk by chunk.
        if lines.is_none() && !send_from(&path, &mut offset, &tx).await {
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
            let Ok(file) = tokio::fs::File::open(&path).await else {
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
            drop(file);
            if !send_from(&path, &mut offset, &tx).await {
                return;
            }
        }
    });
    let mut rx = rx;
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Sends the file from `offset` to its current end in chunks, advancing `offset`; false when
/// the client went away.
async fn send_from(
    path: &Path,
    offset: &mut u64,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) -> bool {
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return true;
    };
    if file.seek(std::io::SeekFrom::Start(*offset)).await.is_err() {
        return true;
    }
    loop {
        let mut chunk = vec![0; CHUNK];
        match file.read(&mut chunk).await {
            Ok(0) | Err(_) => return true,
            Ok(n) => {
                chunk.truncate(n);
                *offset += n as u64;
                if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_of_a_huge_log_is_read_from_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut text = String::new();
        for i in 0..400_000 {
            text.push_str(&format!("line {i} of a guest that floods its console\n"));
        }
        std::fs::write(&path, &text).unwrap();
        let tail = read_tail(&path, 3).unwrap();
        assert_eq!(
            String::from_utf8(tail).unwrap(),
            "line 399997 of a guest that floods its console\n\
             line 399998 of a guest that floods its console\n\
             line 399999 of a guest that floods its console\n"
        );
        // A line longer than the cap: its end, at most the cap.
        std::fs::write(&path, vec![b'x'; (MAX_TAIL as usize) * 2]).unwrap();
        assert_eq!(read_tail(&path, 1).unwrap().len() as u64, MAX_TAIL);
        assert!(read_tail(&dir.path().join("none"), 5).unwrap().is_empty());
    }

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
