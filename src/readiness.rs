//! Telling the service manager that vublk is ready: systemd's `READY=1` over `$NOTIFY_SOCKET`
//! and a pid file that exists exactly while vublk serves.

use std::ffi::OsStr;
use std::io::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

/// Errors of readiness reporting.
#[derive(Debug, thiserror::Error)]
pub enum ReadinessError {
    /// `$NOTIFY_SOCKET` names no unix socket vublk can send to.
    #[error("NOTIFY_SOCKET={0:?} is not a socket path or an @abstract name")]
    NotifyAddress(String),
    /// Sending the notification failed.
    #[error("cannot notify the service manager at {addr}: {source}")]
    Notify {
        /// Where it went.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The pid file names a process that is alive.
    #[error("pid file {path} names process {pid}, which is running; is vublk already serving?")]
    PidFileLive {
        /// The pid file.
        path: PathBuf,
        /// The live process.
        pid: i32,
    },
    /// The pid file holds something that is not a pid.
    #[error("{0} exists and is not a pid file; refusing to overwrite it")]
    NotAPidFile(PathBuf),
    /// Reading, writing or removing the pid file failed.
    #[error("cannot {what} pid file {path}: {source}")]
    PidFile {
        /// The step that failed.
        what: &'static str,
        /// The pid file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Where a notification goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    /// A socket in the file system.
    Path(PathBuf),
    /// A Linux abstract socket (`@name` in `$NOTIFY_SOCKET`, without the `@`).
    Abstract(Vec<u8>),
}

impl NotifyAddr {
    /// Parses `$NOTIFY_SOCKET`: an absolute path, or `@` and an abstract name.
    pub fn parse(value: &OsStr) -> Result<Self, ReadinessError> {
        let bytes = value.as_bytes();
        let bad = || ReadinessError::NotifyAddress(value.to_string_lossy().into_owned());
        match bytes.first() {
            Some(b'/') => Ok(NotifyAddr::Path(PathBuf::from(value))),
            Some(b'@') if bytes.len() > 1 => Ok(NotifyAddr::Abstract(bytes[1..].to_vec())),
            _ => Err(bad()),
        }
    }

    fn socket_addr(&self) -> io::Result<SocketAddr> {
        match self {
            NotifyAddr::Path(p) => SocketAddr::from_pathname(p),
            NotifyAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)
            }
        }
    }
}

impl std::fmt::Display for NotifyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotifyAddr::Path(p) => write!(f, "{}", p.display()),
            NotifyAddr::Abstract(n) => write!(f, "@{}", String::from_utf8_lossy(n)),
        }
    }
}

/// Sends one notification datagram (`state` such as `"READY=1\nSTATUS=..."`).
pub fn notify(addr: &NotifyAddr, state: &str) -> Result<(), ReadinessError> {
    let err = |source| ReadinessError::Notify {
        addr: addr.to_string(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(err)?;
    let to = addr.socket_addr().map_err(err)?;
    sock.send_to_addr(state.as_bytes(), &to).map_err(err)?;
    Ok(())
}

/// Sends `state` to `$NOTIFY_SOCKET` if it is set; returns whether it was.
pub fn notify_service_manager(state: &str) -> Result<bool, ReadinessError> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(v) if !v.is_empty() => notify(&NotifyAddr::parse(&v)?, state).map(|()| true),
        _ => Ok(false),
    }
}

/// A pid file claimed at start-up (nobody else serves with it), written once vublk is ready
/// and removed when this value is dropped.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    written: bool,
}

/// Whether process `pid` exists (a process we may not signal exists too).
fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// What an existing pid file says.
fn parse_pid(text: &str) -> Option<Option<i32>> {
    let t = text.trim();
    if t.is_empty() {
        return Some(None);
    }
    match t.parse::<i32>() {
        Ok(pid) if pid > 0 => Some(Some(pid)),
        _ => None,
    }
}

impl PidFile {
    /// Checks `path`: refused if it names a live process or holds anything but a pid; a stale
    /// one (its process is gone) is left to be replaced by [`PidFile::write`].
    pub fn claim(path: &Path) -> Result<Self, ReadinessError> {
        let err = |what, source| ReadinessError::PidFile {
            what,
            path: path.into(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => match parse_pid(&text) {
                None => return Err(ReadinessError::NotAPidFile(path.into())),
                Some(Some(pid)) if pid != std::process::id() as i32 && process_alive(pid) => {
                    return Err(ReadinessError::PidFileLive {
                        path: path.into(),
                        pid,
                    });
                }
                Some(Some(pid)) => log::info!(
                    "replacing stale pid file {} (process {pid} is gone)",
                    path.display()
                ),
                Some(None) => log::info!("replacing empty pid file {}", path.display()),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(ReadinessError::NotAPidFile(path.into()));
            }
            Err(e) => return Err(err("read", e)),
        }
        Ok(PidFile {
            path: path.into(),
            written: false,
        })
    }

    /// Writes this process's pid, atomically (a temporary file renamed over the path).
    pub fn write(&mut self) -> Result<(), ReadinessError> {
        let err = |what, source| ReadinessError::PidFile {
            what,
            path: self.path.clone(),
            source,
        };
        let mut tmp_name = self.path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = self.path.with_file_name(tmp_name);
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| writeln!(f, "{}", std::process::id()))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(err("write", e));
        }
        self.written = true;
        Ok(())
    }

    /// The pid file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    /// Removes the pid file if it still names this process.
    fn drop(&mut self) {
        if !self.written {
            return;
        }
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| parse_pid(&t))
            .flatten()
            == Some(std::process::id() as i32);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_addresses() {
        assert_eq!(
            NotifyAddr::parse(OsStr::new("/run/systemd/notify")).unwrap(),
            NotifyAddr::Path("/run/systemd/notify".into())
        );
        assert_eq!(
            NotifyAddr::parse(OsStr::new("@sd-notify/1")).unwrap(),
            NotifyAddr::Abstract(b"sd-notify/1".to_vec())
        );
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            assert!(
                matches!(
                    NotifyAddr::parse(OsStr::new(bad)),
                    Err(ReadinessError::NotifyAddress(_))
                ),
                "{bad:?} accepted"
            );
        }
        assert_eq!(NotifyAddr::Abstract(b"x".to_vec()).to_string(), "@x");
    }

    #[test]
    fn notifies_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify(&NotifyAddr::Path(path.clone()), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("vublk-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        notify(
            &NotifyAddr::Abstract(name.into_bytes()),
            "READY=1\nSTATUS=x",
        )
        .unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");

        let gone = NotifyAddr::Path(dir.path().join("nobody"));
        let e = notify(&gone, "READY=1").unwrap_err();
        assert!(e.to_string().contains("nobody"), "{e}");
    }

    #[test]
    fn pid_file_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vublk.pid");
        let mut p = PidFile::claim(&path).unwrap();
        assert!(!path.exists(), "written only when ready");
        p.write().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp left"
        );
        drop(p);
        assert!(!path.exists(), "removed on drop");
    }

    #[test]
    fn live_pid_is_refused_stale_and_empty_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vublk.pid");
        // A live process that is not us: our parent.
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        std::fs::write(&path, format!("{parent}\n")).unwrap();
        let e = PidFile::claim(&path).unwrap_err();
        assert!(matches!(e, ReadinessError::PidFileLive { pid, .. } if pid == parent));
        assert!(e.to_string().contains("vublk.pid"), "{e}");
        // A process that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        std::fs::write(&path, format!("{gone}\n")).unwrap();
        let mut p = PidFile::claim(&path).unwrap();
        p.write().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        drop(p);
        std::fs::write(&path, "").unwrap();
        assert!(PidFile::claim(&path).is_ok());
    }

    #[test]
    fn foreign_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious");
        std::fs::write(&path, "not a pid\n").unwrap();
        assert!(matches!(
            PidFile::claim(&path),
            Err(ReadinessError::NotAPidFile(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a pid\n");
        // A pid file replaced by someone else's is not removed.
        let path = dir.path().join("vublk.pid");
        let mut p = PidFile::claim(&path).unwrap();
        p.write().unwrap();
        std::fs::write(&path, "1\n").unwrap();
        drop(p);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        assert!(PidFile::claim(&dir.path().join("no-dir/x.pid")).is_ok());
        let mut p = PidFile::claim(&dir.path().join("no-dir/x.pid")).unwrap();
        assert!(matches!(p.write(), Err(ReadinessError::PidFile { .. })));
    }
}
