//! The listening socket and the connection loop: one frontend at a time, a fresh backend per
//! connection, the same socket for the next frontend, and an orderly stop on SIGTERM/SIGINT.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::export::Export;
use crate::vhost_user::BlkBackend;

/// How the listening socket is made.
#[derive(Debug, Clone)]
pub struct SocketConfig {
    /// Where.
    pub path: PathBuf,
    /// Permission bits (0600 unless widened).
    pub mode: u32,
    /// Group owner, by name or number.
    pub group: Option<String>,
}

/// Errors of the server layer.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// A live server owns the socket.
    #[error("{0} is in use: another process is listening on it")]
    InUse(PathBuf),
    /// Socket set-up failed.
    #[error("cannot {what} socket {path}: {source}")]
    Socket {
        /// The step that failed.
        what: &'static str,
        /// The socket's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The group does not exist.
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    /// The inherited file descriptor is not a listening unix stream socket.
    #[error("--fd {fd}: {why}; it must be a listening unix stream socket")]
    InheritedFd {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong with it.
        why: String,
    },
    /// Setting up signals, threads or event fds failed.
    #[error("cannot set up the server: {0}")]
    Setup(io::Error),
}

/// Creates the listening socket: a stale socket is replaced, a live one or anything else that
/// is not a socket is left alone.
pub fn bind_socket(cfg: &SocketConfig) -> Result<UnixListener, ServerError> {
    let path = &cfg.path;
    let sock_err = |what, source| ServerError::Socket {
        what,
        path: path.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::InUse(path.clone())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("replacing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| sock_err("remove stale", e))?;
            }
            Err(e) => return Err(sock_err("probe existing", e)),
        },
        Ok(_) => return Err(ServerError::NotASocket(path.clone())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err("inspect", e)),
    }
    // Nobody may connect before the permissions below are in place.
    // SAFETY: umask only swaps the process's file-mode mask.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(|e| sock_err("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.mode))
        .map_err(|e| sock_err("set the mode of", e))?;
    if let Some(group) = &cfg.group {
        let gid = resolve_group(group)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| sock_err("change the group of", e))?;
    }
    Ok(listener)
}

fn resolve_group(group: &str) -> Result<u32, ServerError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(group).map_err(|_| ServerError::UnknownGroup(group.into()))?;
    // SAFETY: an all-zero `group` is a valid value for getgrnam_r to fill in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live local of the right type and `buf.len()` is the
    // buffer's size; getgrnam_r writes only within them.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(ServerError::UnknownGroup(group.into()));
    }
    Ok(grp.gr_gid)
}

/// The connection being served, for the signal thread to stop it.
type Active = Option<(Arc<BlkBackend>, Option<ShutdownHandle>)>;

struct StopState {
    requested: AtomicBool,
    /// Wakes the accept loop.
    wake: EventFd,
    active: Mutex<Active>,
}

impl StopState {
    fn request(&self) {
        let active = {
            let mut guard = self.active.lock().unwrap_or_else(PoisonError::into_inner);
            self.requested.store(true, Ordering::SeqCst);
            guard.take()
        };
        let _ = self.wake.write(1);
        if let Some((backend, handle)) = active {
            stop_connection(&backend, handle.as_ref());
        }
    }

    /// Publishes the new connection unless a stop already came; then the caller stops it.
    fn publish(&self, backend: &Arc<BlkBackend>, handle: Option<ShutdownHandle>) -> bool {
        let mut guard = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if self.requested.load(Ordering::SeqCst) {
            drop(guard);
            stop_connection(backend, handle.as_ref());
            return false;
        }
        *guard = Some((backend.clone(), handle));
        true
    }

    fn unpublish(&self) {
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

/// In-flight requests reach the guest before the connection closes, so the frontend never
/// resubmits a request that was already done.
fn stop_connection(backend: &BlkBackend, handle: Option<&ShutdownHandle>) {
    log::info!("stopping: finishing in-flight requests");
    backend.quiesce();
    if let Some(h) = handle {
        h.shutdown();
    }
}

fn install_signals(stop: Arc<StopState>) -> io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("vublk-signals".into())
        .spawn(move || {
            let mut received = 0;
            for sig in signals.forever() {
                received += 1;
                if received > 1 {
                    log::warn!("second signal {sig}: exiting without waiting");
                    std::process::exit(1);
                }
                log::info!("signal {sig}: shutting down");
                // Tell systemd (Type=notify) the stop has begun, so it waits for it instead of
                // taking the exit for a crash; as on start-up, a failure only costs a warning.
                if let Err(e) = crate::readiness::notify_service_manager(
                    "STOPPING=1\nSTATUS=stopping: finishing in-flight requests",
                ) {
                    log::warn!("{e}");
                }
                stop.request();
            }
        })?;
    Ok(())
}

/// Serves `export` on `listener` until SIGTERM or SIGINT; then removes the socket. `on_ready`
/// runs once the socket accepts connections.
pub fn serve(
    export: Arc<Export>,
    listener: UnixListener,
    socket_path: &Path,
    on_ready: impl FnOnce(),
) -> Result<(), ServerError> {
    let server = Server::prepare(export, listener, Some(socket_path))?;
    on_ready();
    server.run()
}

/// A server whose socket already accepts connections (they wait in the backlog) and whose
/// signal handling is in place, ready to [`run`](Server::run).
pub struct Server {
    export: Arc<Export>,
    listener: Listener,
    stop: Arc<StopState>,
    /// The bound socket's path and identity, to remove it on exit; `None` for a socket vublk
    /// did not create (an inherited fd).
    owned_path: Option<(PathBuf, (u64, u64))>,
    /// For log lines.
    name: PathBuf,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("name", &self.name).finish()
    }
}

impl Server {
    /// Installs the SIGTERM/SIGINT handling for `listener`. `socket_path` is the path vublk
    /// bound, removed on exit if it is still that socket; pass `None` for an inherited socket,
    /// whose path (if any) is left alone.
    pub fn prepare(
        export: Arc<Export>,
        listener: UnixListener,
        socket_path: Option<&Path>,
    ) -> Result<Self, ServerError> {
        let owned_path = socket_path.and_then(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (p.to_path_buf(), (m.dev(), m.ino())))
        });
        let name = match socket_path {
            Some(p) => p.to_path_buf(),
            None => socket_name(&listener),
        };
        let stop = Arc::new(StopState {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(ServerError::Setup)?,
            active: Mutex::new(None),
        });
        install_signals(stop.clone()).map_err(ServerError::Setup)?;
        let listener = Listener::from(listener);
        listener
            .set_nonblocking(true)
            .map_err(|e| ServerError::Setup(io::Error::other(e)))?;
        Ok(Server {
            export,
            listener,
            stop,
            owned_path,
            name,
        })
    }

    /// Serves one frontend after another until SIGTERM or SIGINT; then removes the socket
    /// vublk created (if it is still the one it bound).
    pub fn run(self) -> Result<(), ServerError> {
        let Server {
            export,
            mut listener,
            stop,
            owned_path,
            name,
        } = self;
        let result = accept_loop(&export, &mut listener, &stop, &name);
        drop(listener);
        if let Some((path, id)) = owned_path
            && std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).ok() == Some(id)
        {
            let _ = std::fs::remove_file(&path);
        }
        result
    }
}

/// A listener's path for log lines (`fd` when it has none).
fn socket_name(listener: &UnixListener) -> PathBuf {
    listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(format!("fd {}", listener.as_raw_fd())))
}

/// Takes over a listening socket inherited as file descriptor `fd` (QEMU's `--fd=FDNUM`
/// convention, systemd socket activation): it must be a listening AF_UNIX stream socket.
pub fn listener_from_fd(fd: RawFd) -> Result<UnixListener, ServerError> {
    check_inherited(fd)?;
    // SAFETY: `fd` is open (fstat succeeded) and nothing else in this process owns it: it was
    // inherited from the parent and is named only by the command line, which names it once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Do not leak it into anything vublk may execute.
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(ServerError::InheritedFd {
            fd,
            why: format!("cannot set close-on-exec: {}", io::Error::last_os_error()),
        });
    }
    Ok(UnixListener::from(owned))
}

fn check_inherited(fd: RawFd) -> Result<(), ServerError> {
    let bad = |why: String| ServerError::InheritedFd { fd, why };
    if fd < 0 {
        return Err(bad("not a file descriptor number".into()));
    }
    // SAFETY: an all-zero `stat` is a valid value for fstat to fill in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`; an fd that is not open gives EBADF.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(bad(format!("not open ({})", io::Error::last_os_error())));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket".into()));
    }
    let opt = |name, what| -> Result<libc::c_int, ServerError> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are live locals of the sizes getsockopt is told.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(bad(format!(
                "cannot read its {what}: {}",
                io::Error::last_os_error()
            )));
        }
        Ok(v)
    };
    if opt(libc::SO_DOMAIN, "address family")? != libc::AF_UNIX {
        return Err(bad("not a unix (AF_UNIX) socket".into()));
    }
    if opt(libc::SO_TYPE, "type")? != libc::SOCK_STREAM {
        return Err(bad("not a stream (SOCK_STREAM) socket".into()));
    }
    if opt(libc::SO_ACCEPTCONN, "listening state")? == 0 {
        return Err(bad("not listening (call listen() on it first)".into()));
    }
    Ok(())
}

fn accept_loop(
    export: &Arc<Export>,
    listener: &mut Listener,
    stop: &StopState,
    path: &Path,
) -> Result<(), ServerError> {
    loop {
        if !wait_for_client(listener, stop).map_err(ServerError::Setup)? {
            log::info!("stopped");
            return Ok(());
        }
        if let Err(e) = serve_one(export, listener, stop) {
            // A broken connection is the frontend's problem; keep serving the socket.
            log::warn!("{}: connection ended with an error: {e}", path.display());
        }
        if stop.requested.load(Ordering::SeqCst) {
            log::info!("stopped");
            return Ok(());
        }
        log::info!("{}: waiting for the next frontend", path.display());
    }
}

/// Waits until a client connects (true) or a stop is requested (false).
fn wait_for_client(listener: &Listener, stop: &StopState) -> io::Result<bool> {
    loop {
        if stop.requested.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if stop.requested.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
    }
}

fn serve_one(
    export: &Arc<Export>,
    listener: &mut Listener,
    stop: &StopState,
) -> Result<(), DaemonError> {
    let backend = Arc::new(BlkBackend::new(export.clone()).map_err(DaemonError::StartDaemon)?);
    let mut daemon = VhostUserDaemon::new("vublk-conn".into(), backend.clone(), backend.memory())?;
    let handlers = daemon.get_epoll_handlers();
    for (worker, fd, id) in backend.completion_sources() {
        handlers[worker]
            .register_listener(fd, EventSet::IN, u64::from(id))
            .map_err(DaemonError::StartDaemon)?;
    }
    daemon.start(listener)?;
    log::info!("frontend connected");
    if !stop.publish(&backend, daemon.shutdown_handle()) {
        let _ = daemon.wait();
        return Ok(());
    }
    let result = daemon.wait();
    stop.unpublish();
    match result {
        Ok(())
        | Err(DaemonError::HandleRequest(VhostUserError::Disconnected))
        | Err(DaemonError::HandleRequest(VhostUserError::PartialMessage)) => {
            log::info!("frontend disconnected");
            Ok(())
        }
        Err(e) => Err(e),
    }
    // Dropping the daemon joins the queue threads; dropping the backend then waits for the
    // engines' outstanding I/O.
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &tempfile::TempDir) -> SocketConfig {
        SocketConfig {
            path: dir.path().join("s.sock"),
            mode: 0o600,
            group: None,
        }
    }

    #[test]
    fn socket_is_private_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(&dir);
        let _l = bind_socket(&c).unwrap();
        let mode = std::fs::metadata(&c.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn stale_socket_is_replaced_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(&dir);
        let live = bind_socket(&c).unwrap();
        assert!(matches!(bind_socket(&c), Err(ServerError::InUse(_))));
        drop(live); // the file stays behind, nobody listens: stale
        assert!(c.path.exists());
        let _again = bind_socket(&c).unwrap();
    }

    #[test]
    fn never_removes_what_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(&dir);
        std::fs::write(&c.path, b"precious").unwrap();
        let err = bind_socket(&c).unwrap_err();
        assert!(matches!(err, ServerError::NotASocket(_)));
        assert!(err.to_string().contains("s.sock"), "{err}");
        assert_eq!(std::fs::read(&c.path).unwrap(), b"precious");
    }

    #[test]
    fn inherited_listening_socket_is_taken_over() {
        use std::os::unix::io::IntoRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inherited.sock");
        let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
        let l = listener_from_fd(fd).unwrap();
        assert_eq!(socket_name(&l), path);
        // SAFETY: F_GETFD on a descriptor `l` owns.
        let flags = unsafe { libc::fcntl(l.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        let _c = UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok());
    }

    #[test]
    fn inherited_fd_must_be_a_listening_unix_stream_socket() {
        let dir = tempfile::tempdir().unwrap();
        let why = |fd: RawFd| match listener_from_fd(fd) {
            Err(ServerError::InheritedFd { why, .. }) => why,
            other => panic!("fd {fd}: {other:?}"),
        };
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        assert_eq!(why(file.as_raw_fd()), "not a socket");
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(why(a.as_raw_fd()).starts_with("not listening"));
        let d = std::os::unix::net::UnixDatagram::unbound().unwrap();
        assert!(why(d.as_raw_fd()).starts_with("not a stream"));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(why(tcp.as_raw_fd()).starts_with("not a unix"));
        assert!(why(-1).starts_with("not a file descriptor"));
        assert!(why(1_000_000).starts_with("not open"));
        let e = listener_from_fd(file.as_raw_fd()).unwrap_err().to_string();
        assert!(
            e.contains("--fd") && e.contains("listening unix stream socket"),
            "{e}"
        );
    }

    #[test]
    fn groups_by_number_and_name() {
        assert_eq!(resolve_group("1234").unwrap(), 1234);
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert!(matches!(
            resolve_group("no-such-group-here"),
            Err(ServerError::UnknownGroup(_))
        ));
    }
}
