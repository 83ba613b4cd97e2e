//! Starting threads through two non-generic functions: each body is a `Box<dyn FnOnce>`, so std's
//! spawn machinery (the packet, the start routine, its unwinding guard) is in the binary once
//! instead of once per call site (about 1 KiB each; issue 24). Also the thread of a job pool
//! (the hash pool, the hooks), which runs the boxed jobs a channel brings.

use std::io;
use std::thread::{self, JoinHandle, Scope, ScopedJoinHandle};

use crossbeam_channel::Receiver;

/// A thread's body.
pub type Body = Box<dyn FnOnce() + Send + 'static>;

/// Starts a thread named `name`, with `stack` bytes of stack (std's default when None).
#[inline(never)]
pub fn spawn(name: String, stack: Option<usize>, body: Body) -> io::Result<JoinHandle<()>> {
    let mut builder = thread::Builder::new().name(name);
    if let Some(bytes) = stack {
        builder = builder.stack_size(bytes);
    }
    builder.spawn(body)
}

/// Starts a pool thread named `name`: it runs each job `jobs` brings, in turn, and ends once the
/// channel is empty and every sender is gone.
pub fn spawn_runner(
    name: String,
    stack: Option<usize>,
    jobs: Receiver<Body>,
) -> io::Result<JoinHandle<()>> {
    spawn(
        name,
        stack,
        Box::new(move || {
            for job in jobs.iter() {
                job();
            }
        }),
    )
}

/// Starts a thread in `scope`, as `spawn` does; the body may borrow what outlives the scope.
#[inline(never)]
pub fn spawn_scoped<'scope>(
    scope: &'scope Scope<'scope, '_>,
    name: Option<String>,
    stack: Option<usize>,
    body: Box<dyn FnOnce() + Send + 'scope>,
) -> io::Result<ScopedJoinHandle<'scope, ()>> {
    let mut builder = thread::Builder::new();
    if let Some(name) = name {
        builder = builder.name(name);
    }
    if let Some(bytes) = stack {
        builder = builder.stack_size(bytes);
    }
    builder.spawn_scoped(scope, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_run_their_bodies_with_names() {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = spawn(
            "named".into(),
            Some(256 * 1024),
            Box::new(move || {
                let _ = tx.send(thread::current().name().map(str::to_string));
            }),
        )
        .unwrap();
        handle.join().unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("named"));

        let mut seen = None;
        thread::scope(|s| {
            let h = spawn_scoped(s, None, None, Box::new(|| seen = Some(7))).unwrap();
            h.join().unwrap();
        });
        assert_eq!(seen, Some(7));
    }
}
