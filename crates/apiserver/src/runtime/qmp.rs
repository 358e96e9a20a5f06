//! A QMP client for a VM's control socket: one connection, commands answered in order, events
//! skipped, and descriptors passed along with a command (SCM_RIGHTS), which QMP's `add-fd`
//! needs. Written here because the QMP crates speak only text and this needs the descriptors;
//! it is blocking (the service calls it from `spawn_blocking`) with a timeout on every read.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(control: &Path, timeout: Duration) -> std::io::Result<Qmp> {
        let stream = UnixStream::connect(control)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting)?;
        if !greeting.contains("\"QMP\"") {
            return Err(std::io::Error::other(format!(
                "not a QMP greeting: {}",
                greeting.trim()
            )));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` and returns its answer's `return` value; QEMU's error as the error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> std::io::Result<Value> {
        self.execute_with_fds(command, arguments, &[])
    }

    /// As [`Qmp::execute`], with `fds` passed along with the command.
    pub fn execute_with_fds(
        &mut self,
        command: &str,
        arguments: Value,
        fds: &[BorrowedFd<'_>],
    ) -> std::io::Result<Value> {
        let mut line = serde_json::to_vec(&json!({ "execute": command, "arguments": arguments }))
            .map_err(std::io::Error::other)?;
        line.push(b'\n');
        if fds.is_empty() {
            self.writer.write_all(&line)?;
        } else {
            use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
            let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let sent = sendmsg::<()>(
                self.writer.as_raw_fd(),
                &[IoSlice::new(&line)],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::empty(),
                None,
            )?;
            // The descriptors went with the first byte; the rest is plain data.
            self.writer.write_all(&line[sent..])?;
        }
        self.answer(command)
    }

    /// Reads lines (events may come between) until the command's answer.
    fn answer(&mut self, command: &str) -> std::io::Result<Value> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("QMP closed before answering {command}"),
                ));
            }
            let message: Value = serde_json::from_str(&line).map_err(|e| {
                std::io::Error::other(format!("QMP answered {command} with {e}: {}", line.trim()))
            })?;
            if let Some(r) = message.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = message.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("no reason");
                return Err(std::io::Error::other(format!("QMP {command}: {desc}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A monitor that greets, answers capabilities, sends an event, then answers `add-fd`
    /// with the number of descriptors it received and an error for anything else.
    fn fake_monitor(listener: UnixListener) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("qmp_capabilities"));
            s.write_all(b"{\"return\": {}}\n").unwrap();
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
            let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                .unwrap();
            let mut fds = 0;
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(v) = c {
                    fds += v.len();
                }
            }
            s.write_all(b"{\"event\": \"X\"}\n{\"return\": {\"fdset-id\": 7}}\n")
                .unwrap();
            let _ = s.read(&mut buf).unwrap();
            s.write_all(
                b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such node\"}}\n",
            )
            .unwrap();
            fds
        })
    }

    #[test]
    fn descriptors_travel_with_the_command_and_errors_carry_qemus_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let monitor = fake_monitor(UnixListener::bind(&path).unwrap());
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&file);
        let r = qmp
            .execute_with_fds("add-fd", json!({}), &[fd, fd])
            .unwrap();
        assert_eq!(r["fdset-id"], 7);
        let e = qmp.execute("blockdev-snapshot", json!({})).unwrap_err();
        assert!(e.to_string().contains("no such node"), "{e}");
        assert_eq!(monitor.join().unwrap(), 2);
    }
}
