//! A relay between a client and a daemon that counts the bytes it moves each way and can cut or
//! stall the upload after a given number of bytes: how the tests make a "cut" connection
//! (tests/resume.rs, tests/arm.rs).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long the proxy waits for its one client.
const WAIT: Duration = Duration::from_secs(20);

/// What the proxy does once `limit` bytes went from the client to the server.
#[derive(Clone, Copy, PartialEq)]
pub enum AtLimit {
    /// Close both connections (the server sees the end of its stream).
    Cut,
    /// Forward nothing more until the test lets go (or 30 s pass).
    Stall,
}

/// One client connection relayed to the daemon.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Bytes from the client to the server, and back.
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    release: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: SocketAddr, limit: Option<u64>, at_limit: AtLimit) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let release = Arc::new(AtomicBool::new(false));
        let (up2, down2, release2) = (Arc::clone(&up), Arc::clone(&down), Arc::clone(&release));
        let thread = thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + WAIT;
            let client = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                    Err(_) => return,
                }
            };
            client.set_nonblocking(false).unwrap();
            let server = TcpStream::connect(target).unwrap();
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_read, mut c_write) =
                (server.try_clone().unwrap(), client.try_clone().unwrap());
            let back = thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s_read.read(&mut buf) {
                    if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    down2.fetch_add(n as u64, Ordering::SeqCst);
                }
                let _ = c_write.shutdown(Shutdown::Write);
            });
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = c_read.read(&mut buf) {
                if n == 0 {
                    let _ = s_write.shutdown(Shutdown::Write);
                    break;
                }
                let sent = up2.load(Ordering::SeqCst);
                let allowed = match limit {
                    Some(l) => (l.saturating_sub(sent) as usize).min(n),
                    None => n,
                };
                if s_write.write_all(&buf[..allowed]).is_err() {
                    break;
                }
                up2.fetch_add(allowed as u64, Ordering::SeqCst);
                if allowed < n || limit.is_some_and(|l| sent + allowed as u64 >= l) {
                    if at_limit == AtLimit::Stall {
                        let until = Instant::now() + Duration::from_secs(30);
                        while !release2.load(Ordering::SeqCst) && Instant::now() < until {
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                    let _ = server.shutdown(Shutdown::Both);
                    let _ = client.shutdown(Shutdown::Both);
                    break;
                }
            }
            let _ = back.join();
        });
        Proxy {
            addr,
            up,
            down,
            release,
            thread: Some(thread),
        }
    }

    pub fn up(&self) -> u64 {
        self.up.load(Ordering::SeqCst)
    }

    pub fn down(&self) -> u64 {
        self.down.load(Ordering::SeqCst)
    }

    /// Waits for both directions to end.
    pub fn finish(&mut self) {
        self.release.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.finish();
    }
}
