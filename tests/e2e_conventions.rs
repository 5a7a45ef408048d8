//! QEMU's vhost-user backend program conventions and service-manager integration, end to end
//! through the real binary: --print-capabilities, --fd with an inherited socket, READY=1 on
//! $NOTIFY_SOCKET, --pidfile, `vublk attach-info`; and the shipped examples in qemu-configs/
//! (libvirt's own XML validator, systemd-analyze, every vublk option they use exists).

mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::blk::*;
use common::daemon::{Config, Daemon, READY_TIMEOUT, create_image, describe, test_dir, vublk_bin};
use common::raw::{FrontendOpts, RawFrontend};
use common::*;

const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs vublk to completion.
fn vublk(args: &[&str]) -> Output {
    Command::new(vublk_bin())
        .args(args)
        .output()
        .expect("run vublk")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

// --- --print-capabilities ------------------------------------------------------------------

#[test]
fn print_capabilities_is_a_block_backend_json_object() {
    for args in [
        &["--print-capabilities"][..],
        // "Other options and arguments should be ignored."
        &[
            "--socket-path=/nonexistent/x.sock",
            "--no-such-option",
            "--print-capabilities",
        ],
        &["serve", "--print-capabilities"],
    ] {
        let o = vublk(args);
        assert!(o.status.success(), "{args:?}: {}", describe(&o.status));
        let caps: serde_json::Value = serde_json::from_str(&stdout(&o))
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {:?}", stdout(&o)));
        assert_eq!(caps["type"], "block", "{caps}");
        let features: BTreeSet<&str> = caps["features"]
            .as_array()
            .expect("features is a list")
            .iter()
            .map(|f| f.as_str().expect("features are strings"))
            .collect();
        // vhost-user.json's block features, and only those.
        assert_eq!(features, BTreeSet::from(["read-only", "blk-file"]));
        assert!(
            o.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // What the features promise: both options exist without a subcommand.
    let help = stdout(&vublk(&["--help"]));
    assert!(
        help.contains("--read-only") && help.contains("--blk-file"),
        "{help}"
    );
}

// --- --fd ----------------------------------------------------------------------------------

/// Spawns vublk with `fd` inherited (close-on-exec cleared in the child only), or with no
/// extra descriptor.
fn spawn_inheriting(
    dir: std::sync::Arc<tempfile::TempDir>,
    fd: Option<RawFd>,
    args: &[OsString],
    socket: PathBuf,
    image: PathBuf,
) -> Daemon {
    Daemon::spawn_with(dir, args, socket, image, "debug", move |cmd| {
        let Some(fd) = fd else { return };
        // SAFETY: fcntl is async-signal-safe; it touches only the descriptor the child
        // inherits.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    })
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

#[test]
fn fd_serves_an_inherited_listening_socket() {
    // How QEMU and libvirt start a backend (no subcommand), and `vublk serve --fd`.
    for prefix in [&[][..], &["serve"]] {
        let dir = test_dir();
        let image = dir.path().join("disk.img");
        create_image(
            &image,
            &common::daemon::Image::Pattern {
                size: 4 << 20,
                seed: 3,
            },
        );
        let socket = dir.path().join("inherited.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let fd = listener.as_raw_fd();
        let mut args = os(prefix);
        args.extend(os(&["--fd", &fd.to_string(), "--blk-file"]));
        args.push(image.clone().into());
        args.extend(os(&["--queues", "2"]));
        let mut d = spawn_inheriting(dir.clone(), Some(fd), &args, socket.clone(), image.clone());
        drop(listener); // only the daemon holds the socket now
        d.wait_ready(READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("{prefix:?}: {e}\n{}", d.stderr_excerpt(40, 80)));
        let mut fe = RawFrontend::connect(&socket);
        assert_eq!(fe.queue_num, 2);
        let data = pattern(11, 8192);
        fe.write(1, 64, &data).assert_ok();
        fe.assert_reads(0, 64, &data);
        drop(fe);
        assert_file_range(&image, 64 * 512, &data);
        let st = d.terminate_and_wait(EXIT_TIMEOUT);
        assert!(st.success(), "{prefix:?}: {}", describe(&st));
        assert!(
            std::fs::symlink_metadata(&socket).is_ok(),
            "{prefix:?}: the inherited socket's path was removed"
        );
        assert!(
            d.stderr_text().contains(&format!("fd {fd}")),
            "{}",
            d.stderr_text()
        );
    }
}

#[test]
fn fd_that_is_not_a_listening_unix_socket_fails_clearly() {
    let dir = test_dir();
    let image = dir.path().join("disk.img");
    create_image(&image, &common::daemon::Image::Sparse { size: 1 << 20 });
    let file = std::fs::File::create(dir.path().join("plain")).unwrap();
    let (connected, _peer) = UnixStream::pair().unwrap();
    let cases: [(RawFd, bool, &str); 3] = [
        (file.as_raw_fd(), true, "not a socket"),
        (connected.as_raw_fd(), true, "not listening"),
        (900, false, "not open"),
    ];
    for (fd, inherit, why) in cases {
        let args = os(&[
            "--fd",
            &fd.to_string(),
            "--blk-file",
            image.to_str().unwrap(),
        ]);
        let socket = dir.path().join("unused.sock");
        let mut d = spawn_inheriting(
            dir.clone(),
            inherit.then_some(fd),
            &args,
            socket,
            image.clone(),
        );
        let st = d.wait_exit(EXIT_TIMEOUT).expect("vublk kept running");
        assert_eq!(st.code(), Some(1), "fd {fd}: {}", describe(&st));
        let err = d.stderr_text();
        let expect = format!("--fd {fd}: {why}");
        assert!(err.contains(&expect), "fd {fd}: want {expect:?} in:\n{err}");
        assert!(err.contains("listening unix stream socket"), "{err}");
    }
}

#[test]
fn missing_socket_or_image_fails_early() {
    let dir = test_dir();
    let img = dir.path().join("absent.img");
    let sock = dir.path().join("s.sock");
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec!["--blk-file", img.to_str().unwrap()],
            "give --socket-path PATH or --fd N",
        ),
        (
            vec!["--socket-path", sock.to_str().unwrap()],
            "no image: give --blk-file",
        ),
        (
            vec![
                "--socket-path",
                sock.to_str().unwrap(),
                "--blk-file",
                img.to_str().unwrap(),
            ],
            "does not exist; give --size",
        ),
    ];
    for (args, msg) in cases {
        let o = vublk(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{args:?}: want {msg:?} in {err}");
        assert!(!img.exists() && !sock.exists(), "{args:?} created files");
    }
}

// --- READY=1 and --pidfile -----------------------------------------------------------------

/// A datagram socket standing in for systemd's notify socket.
enum NotifySocket {
    Path(UnixDatagram, PathBuf),
    Abstract(UnixDatagram, String),
}

impl NotifySocket {
    fn path(dir: &Path) -> Self {
        let p = dir.join("notify.sock");
        NotifySocket::Path(UnixDatagram::bind(&p).unwrap(), p)
    }

    fn abstract_name() -> Self {
        use std::os::linux::net::SocketAddrExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vublk-e2e-notify-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        NotifySocket::Abstract(UnixDatagram::bind_addr(&addr).unwrap(), name)
    }

    fn env_value(&self) -> OsString {
        match self {
            NotifySocket::Path(_, p) => p.clone().into(),
            NotifySocket::Abstract(_, n) => format!("@{n}").into(),
        }
    }

    fn sock(&self) -> &UnixDatagram {
        match self {
            NotifySocket::Path(s, _) | NotifySocket::Abstract(s, _) => s,
        }
    }

    /// The next datagram, waiting at most `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.sock().set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock().recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

fn spawn_notifying(
    dir: std::sync::Arc<tempfile::TempDir>,
    cfg: &Config,
    n: &NotifySocket,
) -> Daemon {
    let image = dir.path().join(&cfg.image_name);
    create_image(&image, &cfg.image);
    let socket = dir.path().join(&cfg.socket_name);
    let args = cfg.args(dir.path());
    let env = n.env_value();
    Daemon::spawn_with(dir, &args, socket, image, "debug", move |cmd| {
        cmd.env("NOTIFY_SOCKET", env);
    })
}

#[test]
fn ready_arrives_once_the_socket_accepts_and_the_pidfile_exists_and_stopping_on_sigterm() {
    for abstract_socket in [false, true] {
        let dir = test_dir();
        let notify = if abstract_socket {
            NotifySocket::abstract_name()
        } else {
            NotifySocket::path(dir.path())
        };
        let pidfile = dir.path().join("vublk.pid");
        let cfg = Config::default()
            .arg("--pidfile")
            .arg(pidfile.to_str().unwrap());
        let mut d = spawn_notifying(dir.clone(), &cfg, &notify);
        let msg = notify
            .recv(READY_TIMEOUT)
            .unwrap_or_else(|| panic!("no notification\n{}", d.stderr_excerpt(40, 80)));
        // At the moment READY=1 arrives, the socket takes connections and the pid file is
        // there: a service manager may start QEMU right away.
        let connected = UnixStream::connect(&d.socket);
        let pid_text = std::fs::read_to_string(&pidfile);
        assert!(
            msg.lines().any(|l| l == "READY=1"),
            "abstract={abstract_socket}: {msg:?}"
        );
        assert!(msg.contains("STATUS=serving "), "{msg:?}");
        assert!(
            connected.is_ok(),
            "READY=1 before the socket accepts: {connected:?}"
        );
        assert_eq!(pid_text.unwrap().trim(), d.pid().to_string());
        drop(connected);
        let mut fe = RawFrontend::connect(&d.socket);
        fe.flush(0).assert_ok();
        drop(fe);
        assert_eq!(
            notify.recv(Duration::from_millis(200)),
            None,
            "a second READY"
        );
        let st = d.terminate_and_wait(EXIT_TIMEOUT);
        assert!(st.success(), "{}", describe(&st));
        assert!(!pidfile.exists(), "pid file left after SIGTERM");
        assert!(std::fs::symlink_metadata(&d.socket).is_err(), "socket left");
        // SIGTERM announced the stop to the service manager.
        let msg = notify.recv(Duration::from_secs(1)).unwrap_or_default();
        assert!(
            msg.lines().any(|l| l == "STOPPING=1") && msg.contains("STATUS=stopping"),
            "abstract={abstract_socket}: no STOPPING=1 on SIGTERM: {msg:?}"
        );
    }
}

#[test]
fn no_ready_and_no_pidfile_when_start_fails() {
    let dir = test_dir();
    let notify = NotifySocket::path(dir.path());
    let pidfile = dir.path().join("vublk.pid");
    // The image is missing and --size is not given.
    let cfg = Config::default()
        .no_image()
        .arg("--pidfile")
        .arg(pidfile.to_str().unwrap());
    let mut d = spawn_notifying(dir.clone(), &cfg, &notify);
    let st = d.wait_exit(EXIT_TIMEOUT).expect("vublk kept running");
    assert!(!st.success());
    assert!(
        d.stderr_text().contains("does not exist; give --size"),
        "{}",
        d.stderr_text()
    );
    assert_eq!(notify.recv(Duration::from_millis(100)), None);
    assert!(!pidfile.exists());
}

/// The pid file is written just after the socket starts accepting (before READY=1), so a test
/// that saw the socket accept waits a little for it.
fn assert_pidfile_names(pidfile: &Path, pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(pidfile).unwrap_or_default();
        if text.trim() == pid.to_string() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pid file {} holds {text:?}, not {pid}",
            pidfile.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pidfile_of_a_live_daemon_is_refused_a_stale_one_replaced() {
    let dir = test_dir();
    let pidfile = dir.path().join("vublk.pid");
    let pid_arg = |c: Config| c.arg("--pidfile").arg(pidfile.to_str().unwrap());
    let mut first = Daemon::start_in(dir.clone(), pid_arg(Config::default()));
    assert_pidfile_names(&pidfile, first.pid());

    // A second daemon (its own image and socket) with the same pid file.
    let cfg = pid_arg(Config {
        image_name: "other.img".into(),
        socket_name: "other.sock".into(),
        ..Config::default()
    });
    let mut second = Daemon::spawn_cfg(dir.clone(), &cfg);
    let st = second
        .wait_exit(EXIT_TIMEOUT)
        .expect("second vublk kept running");
    assert_eq!(st.code(), Some(1), "{}", describe(&st));
    let err = second.stderr_text();
    assert!(
        err.contains(&format!("names process {}, which is running", first.pid())),
        "{err}"
    );
    assert!(
        !dir.path().join("other.sock").exists(),
        "second bound its socket"
    );
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        first.pid().to_string()
    );

    let st = first.terminate_and_wait(EXIT_TIMEOUT);
    assert!(st.success(), "{}", describe(&st));
    assert!(!pidfile.exists(), "pid file not removed on SIGTERM");

    // A stale pid file: its process is gone.
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    std::fs::write(&pidfile, format!("{gone_pid}\n")).unwrap();
    let mut third = Daemon::start_in(dir.clone(), pid_arg(Config::default()));
    assert_pidfile_names(&pidfile, third.pid());
    assert!(third.terminate_and_wait(EXIT_TIMEOUT).success());
    assert!(!pidfile.exists());
}

// --- attach-info ---------------------------------------------------------------------------

/// The serve arguments of `cfg` turned into an attach-info command line.
fn attach_info(cfg: &Config, dir: &Path, extra: &[&str]) -> String {
    let mut args = cfg.args(dir);
    assert_eq!(args[0], "serve");
    args[0] = "attach-info".into();
    args.extend(os(extra));
    let o = Command::new(vublk_bin()).args(&args).output().unwrap();
    assert!(
        o.status.success(),
        "attach-info {args:?}: {}\n{}",
        describe(&o.status),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

#[test]
fn attach_info_matches_the_running_export() {
    for (cfg, serial) in [
        (
            Config::default()
                .queues(3)
                .queue_size(128)
                .serial("e2e-disk0")
                .read_only(),
            Some("e2e-disk0"),
        ),
        (Config::default().queues(1), None),
    ] {
        let d = Daemon::start(cfg.clone());
        let queue_size = cfg.queue_size.unwrap_or(256);
        let opts = FrontendOpts::default().queue_size(queue_size as u16);
        let mut fe = RawFrontend::connect_with(&d.socket, opts).unwrap();
        let served_serial = {
            let id = fe.get_id(0);
            let end = id
                .data
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(id.data.len());
            String::from_utf8(id.data[..end].to_vec()).unwrap()
        };
        if let Some(s) = serial {
            assert_eq!(served_serial, s);
        }
        let read_only = fe.has_feature(VIRTIO_BLK_F_RO);
        let queues = fe.queue_num;
        drop(fe);
        let sock = d.socket.display().to_string();

        let qemu = attach_info(&cfg, d.dir.path(), &["--format", "qemu", "--memory", "2G"]);
        let lines: Vec<&str> = qemu.lines().collect();
        assert_eq!(
            lines,
            [
                "-object",
                "memory-backend-memfd,id=mem,size=2G,share=on",
                "-machine",
                "memory-backend=mem",
                "-chardev",
                &format!("socket,id=vublk0,path={sock},reconnect-ms=1000"),
                "-device",
                &format!(
                    "vhost-user-blk-pci,chardev=vublk0,num-queues={queues},queue-size={queue_size}"
                ),
            ]
        );

        let xml = attach_info(&cfg, d.dir.path(), &[]);
        assert!(
            xml.starts_with("<disk type='vhostuser' device='disk'>\n"),
            "{xml}"
        );
        assert!(
            xml.contains(&format!(
                "<driver name='qemu' type='raw' queues='{queues}' queue_size='{queue_size}'/>"
            )),
            "{xml}"
        );
        assert!(
            xml.contains(&format!("<source type='unix' path='{sock}'>")),
            "{xml}"
        );
        assert!(xml.contains("<reconnect enabled='yes' timeout='1'/>"));
        assert!(xml.contains("<target dev='vda' bus='virtio'/>"));
        // The default serial (derived from the image) is the one the daemon serves too.
        assert!(xml.contains(&format!("serial {served_serial}")), "{xml}");
        assert_eq!(xml.contains("read-only"), read_only, "{xml}");
        let with_dev = attach_info(&cfg, d.dir.path(), &["--target-dev", "vdc"]);
        assert!(with_dev.contains("<target dev='vdc' bus='virtio'/>"));
    }
}

// --- the shipped examples and libvirt's validator ------------------------------------------

/// `virt-xml-validate`, installed by `.ci/install-libvirt-validator` if missing.
fn validator() -> &'static str {
    let have = || {
        ["virt-xml-validate", "xmllint"].iter().all(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    };
    // Tests run in parallel threads: one of them installs, the others wait for it.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if !have() {
        let script = repo().join(".ci/install-libvirt-validator");
        let st = Command::new("bash").arg(&script).status();
        assert!(
            have(),
            "libvirt's XML validator is missing: virt-xml-validate (Debian package \
             libvirt-clients) and xmllint (libxml2-utils) are needed; {} failed: {st:?}",
            script.display()
        );
    }
    "virt-xml-validate"
}

/// Validates one XML document against libvirt's domain schema.
#[track_caller]
fn assert_valid_domain(xml: &str, what: &str) {
    let dir = test_dir();
    let path = dir.path().join("domain.xml");
    std::fs::write(&path, xml).unwrap();
    let o = Command::new(validator())
        .arg(&path)
        .arg("domain")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{what} does not validate:\n{}{}\n--- document ---\n{xml}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A `<disk>` element inside the smallest domain libvirt's schema accepts.
fn wrap_disk(disk: &str) -> String {
    format!(
        "<domain type='kvm'>\n  <name>validate</name>\n  <memory unit='KiB'>1048576</memory>\n  \
         <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n  \
         <os><type arch='x86_64' machine='q35'>hvm</type></os>\n  <devices>\n{disk}  </devices>\n\
         </domain>\n"
    )
}

#[test]
fn validator_rejects_a_broken_disk() {
    // The validator itself must be able to fail, or the checks below prove nothing.
    let dir = test_dir();
    let path = dir.path().join("bad.xml");
    std::fs::write(
        &path,
        wrap_disk("<disk type='vhostuser' device='disk'><source type='tcp'/></disk>\n"),
    )
    .unwrap();
    let o = Command::new(validator())
        .arg(&path)
        .arg("domain")
        .output()
        .unwrap();
    assert!(!o.status.success(), "an invalid vhostuser disk validated");
}

fn shipped(ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("qemu-configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn shipped_libvirt_xml_validates() {
    let files = shipped("xml");
    assert!(
        files.len() >= 2,
        "expected a disk and a domain example: {files:?}"
    );
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let body = text.trim_start();
        let doc = if body.contains("<domain") {
            text.clone()
        } else {
            assert!(body.contains("<disk type='vhostuser'"), "{}", f.display());
            wrap_disk(&text)
        };
        assert_valid_domain(&doc, &f.display().to_string());
    }
}

#[test]
fn generated_libvirt_xml_validates() {
    let dir = test_dir();
    let base = Config::default().no_image();
    for cfg in [
        base.clone(),
        base.clone()
            .queues(4)
            .queue_size(1024)
            .serial("x<&>'\"y")
            .read_only(),
        base.clone().serial("a--b-"),
    ] {
        let disk = attach_info(&cfg, dir.path(), &["--target-dev", "vdb"]);
        assert_valid_domain(&wrap_disk(&disk), &format!("attach-info for {cfg:?}"));
        let domain = attach_info(
            &cfg,
            dir.path(),
            &["--format", "libvirt-domain", "--name", "vm<1>"],
        );
        assert!(domain.contains("<access mode='shared'/>"));
        assert_valid_domain(
            &domain,
            &format!("attach-info --format libvirt-domain for {cfg:?}"),
        );
    }
}

// --- every vublk option in the shipped files exists ----------------------------------------

const SUBCOMMANDS: [&str; 4] = ["serve", "probe", "bench", "attach-info"];

/// (subcommand or "", option) for every `--option` of a vublk command line in `text`.
/// Shell continuations are joined; a command ends at a shell operator.
fn vublk_options(text: &str, env_keys: &[&str]) -> Vec<(String, String)> {
    let joined = text.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines() {
        let line = line.trim();
        // Option lists kept in a variable or an EnvironmentFile, e.g. VUBLK_OPTS="--queues 2".
        if let Some((key, value)) = line.split_once('=')
            && env_keys.contains(&key.trim())
        {
            for t in value.trim_matches(['"', '\'', '(', ')']).split_whitespace() {
                if let Some(opt) = t.strip_prefix("--") {
                    let name = opt
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-');
                    out.push((String::new(), name.collect()));
                }
            }
            continue;
        }
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let mut i = 0;
        while i < tokens.len() {
            // `vublk`, `/usr/bin/vublk`, `ExecStart=/usr/bin/vublk`, `$(vublk`, `<(vublk`.
            let t = tokens[i].rsplit(['=', '(', '`', '<']).next().unwrap();
            let is_vublk = t == "vublk" || t.ends_with("/vublk");
            i += 1;
            if !is_vublk {
                continue;
            }
            let sub = match tokens.get(i) {
                Some(s) if SUBCOMMANDS.contains(s) => {
                    i += 1;
                    s.to_string()
                }
                _ => String::new(),
            };
            while i < tokens.len() && !["&", "&&", "|", "||", ";", ")", "`"].contains(&tokens[i]) {
                if let Some(opt) = tokens[i].strip_prefix("--") {
                    let name: String = opt
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    if !name.is_empty() {
                        out.push((sub.clone(), name));
                    }
                }
                if tokens[i].ends_with(['&', ';', ')', '`']) {
                    break;
                }
                i += 1;
            }
        }
    }
    out
}

fn help_text(sub: &str) -> String {
    let o = if sub.is_empty() {
        vublk(&["--help"])
    } else {
        vublk(&[sub, "--help"])
    };
    assert!(o.status.success());
    stdout(&o)
}

fn help_has(help: &str, opt: &str) -> bool {
    let flag = format!("--{opt}");
    help.match_indices(&flag).any(|(i, _)| {
        help[i + flag.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-'))
    })
}

#[test]
fn option_scanner_finds_options() {
    let found = vublk_options(
        "x=$(vublk attach-info --socket-path \"$S\" --format=qemu)\n\
         ExecStart=/usr/bin/vublk --socket-path=${S} \\\n  --no-such $VUBLK_OPTS\n\
         vublk serve --file a --queues 2 & qemu --device x\n\
         VUBLK_OPTS=\"--queue-size 128 --read-only\"\n",
        &["VUBLK_OPTS"],
    );
    let want = [
        ("attach-info", "socket-path"),
        ("attach-info", "format"),
        ("", "socket-path"),
        ("", "no-such"),
        ("serve", "file"),
        ("serve", "queues"),
        ("", "queue-size"),
        ("", "read-only"),
    ];
    assert_eq!(
        found,
        want.map(|(s, o)| (s.to_string(), o.to_string())).to_vec()
    );
    let help = help_text("");
    assert!(help_has(&help, "socket-path") && !help_has(&help, "no-such"));
    assert!(!help_has(&help, "socket-p"));
}

#[test]
fn shipped_files_use_only_options_vublk_has() {
    let mut files: Vec<PathBuf> = ["sh", "service", "conf", "xml", "json"]
        .iter()
        .flat_map(|e| shipped(e))
        .collect();
    files.push(repo().join("README.md"));
    let mut checked = 0;
    let mut helps = std::collections::HashMap::new();
    for f in &files {
        let mut text = std::fs::read_to_string(f).unwrap();
        if f.extension().is_some_and(|e| e == "md") {
            // Only the README's code blocks are command lines.
            text = text
                .split("```")
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, b)| b)
                .collect::<Vec<_>>()
                .join("\n");
        }
        for (sub, opt) in vublk_options(&text, &["VUBLK_OPTS", "VUBLK_ARGS"]) {
            let help = helps.entry(sub.clone()).or_insert_with(|| help_text(&sub));
            assert!(
                help_has(help, &opt),
                "{}: `vublk {sub} --{opt}`: vublk has no such option",
                f.display()
            );
            checked += 1;
        }
    }
    // The per-VM script, the units, the EnvironmentFile example and the README all run vublk.
    assert!(checked >= 20, "only {checked} options found in {files:?}");
}

#[test]
fn shipped_vhost_user_descriptor_follows_the_schema() {
    let files = shipped("json");
    assert_eq!(files.len(), 1, "{files:?}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    let obj = v.as_object().unwrap();
    // VhostUserBackend: description, type, binary (absolute), optional tags; nothing else.
    for k in obj.keys() {
        assert!(
            ["description", "type", "binary", "tags"].contains(&k.as_str()),
            "{k}"
        );
    }
    assert_eq!(v["type"], "block");
    assert!(v["description"].as_str().is_some_and(|d| !d.is_empty()));
    assert!(
        v["binary"]
            .as_str()
            .is_some_and(|b| b.starts_with('/') && b.ends_with("/vublk"))
    );
    let name = files[0].file_name().unwrap().to_str().unwrap();
    assert!(
        name.len() > 3 && name[..2].bytes().all(|b| b.is_ascii_digit()) && &name[2..3] == "-",
        "{name}: the schema asks for a double-digit prefix"
    );
}

// --- systemd units -------------------------------------------------------------------------

#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let units = shipped("service");
    let names: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["vublk.service", "vublk@.service"]);
    let dir = test_dir();
    let mut to_verify = Vec::new();
    for (unit, name) in units.iter().zip(&names) {
        let text = std::fs::read_to_string(unit).unwrap();
        assert!(text.contains("\nType=notify\n"), "{name}: not Type=notify");
        assert!(text.contains("--pidfile"), "{name}: no --pidfile");
        // systemd-analyze checks that the binary exists: point it at the one under test.
        let text = text.replace("/usr/bin/vublk", vublk_bin());
        std::fs::write(dir.path().join(name), text).unwrap();
        // A template is verified through an instance.
        to_verify.push(dir.path().join(name.replace("@.", "@vm1.")));
    }
    std::fs::copy(dir.path().join("vublk@.service"), &to_verify[1]).unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .args(&to_verify)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze (package systemd) cannot run: {e}"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify failed:\n{err}");
    // Warnings about our units count as failures too (other units on the host may warn).
    for name in ["vublk.service", "vublk@vm1.service"] {
        assert!(!err.contains(name), "systemd-analyze complains:\n{err}");
    }
}
