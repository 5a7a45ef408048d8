//! Bounds blocking vhost-user message exchanges: the vhost crate retries reads forever
//! (SO_RCVTIMEO only makes it spin), so a daemon that never replies would hang a test.
//! While armed, the watchdog shuts the socket down once the deadline passes, which makes
//! the pending call fail.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    deadline: Option<Instant>,
    depth: u32,
    stop: bool,
    fired: bool,
}

pub struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
}

pub struct Armed<'a>(&'a Watchdog);

impl Watchdog {
    pub fn new(fd: RawFd, timeout: Duration) -> Watchdog {
        // SAFETY: dup of a valid descriptor; the result is checked and owned below.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        assert!(dup >= 0, "dup: {}", std::io::Error::last_os_error());
        // SAFETY: `dup` is a fresh descriptor we own.
        let sock = unsafe { OwnedFd::from_raw_fd(dup) };
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-watchdog".into())
            .spawn(move || {
                let (m, cv) = &*sh;
                let mut st = m.lock().unwrap();
                loop {
                    if st.stop {
                        break;
                    }
                    match st.deadline {
                        None => st = cv.wait(st).unwrap(),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                // SAFETY: shutdown on a socket descriptor we own.
                                unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
                                st.fired = true;
                                st.deadline = None;
                            } else {
                                st = cv.wait_timeout(st, d - now).unwrap().0;
                            }
                        }
                    }
                }
            })
            .unwrap();
        Watchdog {
            shared,
            thread: Some(thread),
            timeout,
        }
    }

    /// Arm until the returned guard is dropped (nested arms keep the first deadline).
    pub fn arm(&self) -> Armed<'_> {
        let (m, cv) = &*self.shared;
        let mut st = m.lock().unwrap();
        if st.depth == 0 {
            st.deadline = Some(Instant::now() + self.timeout);
        }
        st.depth += 1;
        cv.notify_all();
        Armed(self)
    }

    /// True once the watchdog has shut the connection down.
    pub fn fired(&self) -> bool {
        self.shared.0.lock().unwrap().fired
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let (m, cv) = &*self.0.shared;
        let mut st = m.lock().unwrap();
        st.depth -= 1;
        if st.depth == 0 {
            st.deadline = None;
        }
        cv.notify_all();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.shared;
            m.lock().unwrap().stop = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
