//! Spawning and supervising the daemon under test.
//!
//! By default the daemon is `target/.../vublk`. With `VUBLK_E2E_TARGET=qsd` the same
//! configurations are served by qemu-storage-daemon instead (useful to check the harness
//! itself; vublk-specific assertions are then expected to fail).

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Vublk,
    Qsd,
}

pub fn target() -> Target {
    match std::env::var("VUBLK_E2E_TARGET").as_deref() {
        Ok("qsd") => Target::Qsd,
        _ => Target::Vublk,
    }
}

pub fn vublk_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vublk")
}

/// Fresh temporary directory shared by the pieces of one test.
pub fn test_dir() -> Arc<TempDir> {
    Arc::new(
        tempfile::Builder::new()
            .prefix("vublk-e2e-")
            .tempdir()
            .expect("tempdir"),
    )
}

/// What the image file looks like before the daemon starts.
#[derive(Clone, Debug)]
pub enum Image {
    /// Don't create the image (e.g. to test --size creation).
    None,
    /// Create it filled with `pattern(seed, size)`.
    Pattern { size: u64, seed: u64 },
    /// Create a sparse file of this size (reads zeros).
    Sparse { size: u64 },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub image: Image,
    pub image_name: String,
    pub socket_name: String,
    pub read_only: bool,
    pub queues: Option<u32>,
    pub queue_size: Option<u32>,
    pub serial: Option<String>,
    pub logical_block_size: Option<u32>,
    pub write_cache: Option<String>,
    /// Value for --size.
    pub size: Option<String>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    pub extra_args: Vec<String>,
    pub rust_log: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            image: Image::Pattern {
                size: 16 << 20,
                seed: 1,
            },
            image_name: "disk.img".into(),
            socket_name: "vhost.sock".into(),
            read_only: false,
            queues: None,
            queue_size: None,
            serial: None,
            logical_block_size: None,
            write_cache: None,
            size: None,
            socket_mode: None,
            socket_group: None,
            extra_args: Vec::new(),
            rust_log: "debug".into(),
        }
    }
}

impl Config {
    pub fn image_pattern(mut self, size: u64, seed: u64) -> Self {
        self.image = Image::Pattern { size, seed };
        self
    }
    pub fn image_sparse(mut self, size: u64) -> Self {
        self.image = Image::Sparse { size };
        self
    }
    pub fn no_image(mut self) -> Self {
        self.image = Image::None;
        self
    }
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
    pub fn queues(mut self, n: u32) -> Self {
        self.queues = Some(n);
        self
    }
    pub fn queue_size(mut self, n: u32) -> Self {
        self.queue_size = Some(n);
        self
    }
    pub fn serial(mut self, s: &str) -> Self {
        self.serial = Some(s.into());
        self
    }
    pub fn lbs(mut self, n: u32) -> Self {
        self.logical_block_size = Some(n);
        self
    }
    pub fn write_cache(mut self, s: &str) -> Self {
        self.write_cache = Some(s.into());
        self
    }
    pub fn size(mut self, s: &str) -> Self {
        self.size = Some(s.into());
        self
    }
    pub fn socket_mode(mut self, s: &str) -> Self {
        self.socket_mode = Some(s.into());
        self
    }
    pub fn arg(mut self, s: &str) -> Self {
        self.extra_args.push(s.into());
        self
    }

    /// Command-line arguments for the daemon (for the selected target).
    pub fn args(&self, dir: &Path) -> Vec<OsString> {
        let socket = dir.join(&self.socket_name);
        let image = dir.join(&self.image_name);
        match target() {
            Target::Vublk => {
                let mut a: Vec<OsString> = vec![
                    "serve".into(),
                    "--socket".into(),
                    socket.into(),
                    "--file".into(),
                    image.into(),
                ];
                let mut opt = |k: &str, v: &Option<String>| {
                    if let Some(v) = v {
                        a.push(k.into());
                        a.push(v.into());
                    }
                };
                opt("--size", &self.size);
                opt("--queues", &self.queues.map(|v| v.to_string()));
                opt("--queue-size", &self.queue_size.map(|v| v.to_string()));
                opt("--serial", &self.serial);
                opt(
                    "--logical-block-size",
                    &self.logical_block_size.map(|v| v.to_string()),
                );
                opt("--write-cache", &self.write_cache);
                opt("--socket-mode", &self.socket_mode);
                opt("--socket-group", &self.socket_group);
                if self.read_only {
                    a.push("--read-only".into());
                }
                a.extend(self.extra_args.iter().map(OsString::from));
                a
            }
            Target::Qsd => {
                let ro = if self.read_only { "on" } else { "off" };
                let mut export = format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable={},num-queues={}",
                    socket.display(),
                    if self.read_only { "off" } else { "on" },
                    self.queues.unwrap_or(1)
                );
                if let Some(l) = self.logical_block_size {
                    export.push_str(&format!(",logical-block-size={l}"));
                }
                vec![
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=f0,filename={},read-only={ro},discard=unmap",
                        image.display()
                    )
                    .into(),
                    "--export".into(),
                    export.into(),
                ]
            }
        }
    }
}

/// Create the image file described by `img` at `path`.
pub fn create_image(path: &Path, img: &Image) {
    match *img {
        Image::None => {}
        Image::Pattern { size, seed } => {
            std::fs::write(path, super::blk::pattern(seed, size as usize)).unwrap();
        }
        Image::Sparse { size } => {
            File::create(path).unwrap().set_len(size).unwrap();
        }
    }
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: Arc<TempDir>,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub stderr_path: PathBuf,
    pub exit_status: Option<ExitStatus>,
}

impl Daemon {
    /// Create the image, start the daemon in a fresh temp dir, wait until it listens.
    #[track_caller]
    pub fn start(cfg: Config) -> Daemon {
        Self::start_in(test_dir(), cfg)
    }

    #[track_caller]
    pub fn start_in(dir: Arc<TempDir>, cfg: Config) -> Daemon {
        let mut d = Self::spawn_cfg(dir, &cfg);
        if let Err(e) = d.wait_ready(READY_TIMEOUT) {
            panic!(
                "daemon did not become ready: {e}\n--- daemon stderr ---\n{}",
                d.stderr_excerpt(40, 120)
            );
        }
        d
    }

    /// Create the image (if configured) and spawn, without waiting.
    pub fn spawn_cfg(dir: Arc<TempDir>, cfg: &Config) -> Daemon {
        Self::spawn_cfg_with(dir, cfg, |_| {})
    }

    /// Like [`Daemon::spawn_cfg`], with `customize` adjusting the command first.
    pub fn spawn_cfg_with(
        dir: Arc<TempDir>,
        cfg: &Config,
        customize: impl FnOnce(&mut Command),
    ) -> Daemon {
        let image = dir.path().join(&cfg.image_name);
        create_image(&image, &cfg.image);
        let socket = dir.path().join(&cfg.socket_name);
        let args = cfg.args(dir.path());
        Self::spawn_with(dir, &args, socket, image, &cfg.rust_log, customize)
    }

    /// Spawn with explicit arguments (vublk only).
    pub fn spawn_args(
        dir: Arc<TempDir>,
        args: &[OsString],
        socket: PathBuf,
        image: PathBuf,
        rust_log: &str,
    ) -> Daemon {
        Self::spawn_with(dir, args, socket, image, rust_log, |_| {})
    }

    /// Like [`Daemon::spawn_args`], with `customize` adjusting the command first (extra
    /// environment, descriptors to inherit).
    pub fn spawn_with(
        dir: Arc<TempDir>,
        args: &[OsString],
        socket: PathBuf,
        image: PathBuf,
        rust_log: &str,
        customize: impl FnOnce(&mut Command),
    ) -> Daemon {
        let program = match target() {
            Target::Vublk => vublk_bin(),
            Target::Qsd => "qemu-storage-daemon",
        };
        // Unique log name so several daemons can share a directory.
        let mut n = 0;
        let stderr_path = loop {
            let p = dir.path().join(format!("daemon-{n}.stderr"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let err = File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(program);
        // SAFETY: the closure only calls prctl, which is async-signal-safe. It makes the
        // kernel kill the daemon if the test thread that spawned it goes away (e.g. the test
        // binary is killed), so no daemon outlives its test.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        customize(&mut cmd);
        let child = cmd
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Daemon {
            child: Some(child),
            dir,
            socket,
            image,
            stderr_path,
            exit_status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The first `head` and last `tail` lines of stderr (each line cut at 300 chars), for
    /// failure messages: a misbehaving daemon may log gigabytes.
    pub fn stderr_excerpt(&self, head: usize, tail: usize) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = File::open(&self.stderr_path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let cut = |s: &str| -> String { s.chars().take(300).collect() };
        let mut first = vec![0u8; len.min(64 << 10) as usize];
        let _ = f.read_exact(&mut first);
        let first = String::from_utf8_lossy(&first);
        if len <= 64 << 10 && first.lines().count() <= head + tail {
            return first.lines().map(cut).collect::<Vec<_>>().join("\n") + "\n";
        }
        let start = len.saturating_sub(64 << 10);
        let _ = f.seek(SeekFrom::Start(start));
        let mut last = Vec::new();
        let _ = f.read_to_end(&mut last);
        let last = String::from_utf8_lossy(&last);
        let last_lines: Vec<&str> = last.lines().collect();
        let mut out: Vec<String> = first.lines().take(head).map(cut).collect();
        out.push(format!("[... {len} bytes in total ...]"));
        out.extend(
            last_lines[last_lines.len().saturating_sub(tail)..]
                .iter()
                .map(|l| cut(l)),
        );
        out.join("\n") + "\n"
    }

    /// Poll until the socket exists and accepts a connection, or the daemon exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Err(format!("daemon exited early with {st}"));
            }
            let is_sock = std::fs::symlink_metadata(&self.socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if is_sock && UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "socket {} not accepting after {timeout:?}",
                    self.socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Non-blocking check for exit.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if let Some(st) = self.exit_status {
            return Some(st);
        }
        let st = self.child.as_mut()?.try_wait().unwrap();
        if st.is_some() {
            self.exit_status = st;
            self.child = None;
        }
        st
    }

    /// Wait (bounded) for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: sending a signal to our own child process, which has not been reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    /// SIGTERM, then wait up to `timeout`; SIGKILL (and panic) if it does not exit.
    #[track_caller]
    pub fn terminate_and_wait(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(timeout) {
            Some(st) => st,
            None => {
                self.signal(libc::SIGKILL);
                let st = self.wait_exit(Duration::from_secs(5));
                panic!(
                    "daemon did not exit within {timeout:?} of SIGTERM (killed: {st:?})\n--- daemon stderr ---\n{}",
                    self.stderr_excerpt(40, 120)
                );
            }
        }
    }

    /// Names of the daemon's threads (from /proc/PID/task/*/comm).
    pub fn thread_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return out;
        };
        for e in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("comm")) {
                out.push(s.trim_end().to_string());
            }
        }
        out.sort();
        out
    }

    /// Poll until `pred(thread names)` holds; returns the last names seen and whether it held.
    pub fn wait_threads(
        &self,
        timeout: Duration,
        pred: impl Fn(&[String]) -> bool,
    ) -> (Vec<String>, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let names = self.thread_names();
            if pred(&names) {
                return (names, true);
            }
            if Instant::now() >= deadline {
                return (names, false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own unreaped child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- daemon stderr ({}) ---\n{}--- end ---",
                self.stderr_path.display(),
                self.stderr_excerpt(40, 120)
            );
        }
    }
}

/// Human-readable description of an exit status.
pub fn describe(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st:?}"),
    }
}
