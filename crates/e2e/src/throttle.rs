//! A rate-limited TCP relay, to keep a download under way while a test acts on it.

use std::time::Duration;

use crate::enter_netns;

/// A TCP relay on a free loopback port that passes what the far end sends at a bounded rate,
/// so that a download is reliably still under way when a test acts on it. Stops on drop.
#[derive(Debug)]
pub struct Throttle {
    pub addr: String,
    /// Bytes per second towards the client; 0 for no limit.
    rate: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Throttle {
    /// Relays to `upstream` (`host:port`), `bytes_per_second` towards the client.
    pub fn start(upstream: &str, bytes_per_second: u64) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let rate = Arc::new(AtomicU64::new(bytes_per_second));
        let stop = Arc::new(AtomicBool::new(false));
        let (upstream, thread_rate, thread_stop) =
            (upstream.to_string(), rate.clone(), stop.clone());
        let (bound, addr) = std::sync::mpsc::channel();
        // The relay lives in the test namespace, beside the registry and the service: its
        // thread enters it before making any socket (threads it starts inherit it).
        std::thread::spawn(move || {
            enter_netns();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay");
            bound
                .send(listener.local_addr().unwrap().to_string())
                .unwrap();
            for client in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    break;
                }
                let (Ok(client), Ok(server)) = (client, std::net::TcpStream::connect(&upstream))
                else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || relay(c2, s2, None));
                let rate = thread_rate.clone();
                std::thread::spawn(move || relay(server, client, Some(rate)));
            }
        });
        let addr = addr.recv().expect("the relay is bound");
        Self { addr, rate, stop }
    }

    /// Changes the rate of every connection, open ones included; 0 for no limit.
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate
            .store(bytes_per_second, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either ends, pacing to `rate` bytes per second if given, then
/// closes both so the other direction ends too.
fn relay(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    rate: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        let limit = rate
            .as_ref()
            .map_or(0, |r| r.load(std::sync::atomic::Ordering::SeqCst));
        if limit > 0 {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / limit as f64));
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag (from inside the namespace it is in).
        let addr = self.addr.clone();
        let _ = std::thread::spawn(move || {
            enter_netns();
            let _ = std::net::TcpStream::connect(&addr);
        })
        .join();
    }
}
