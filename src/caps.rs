//! What the running kernel lets vublk use: io_uring and Linux native AIO.
//!
//! MERGE: this is a stand-in. When the io_uring and linux-aio engines are merged,
//! [`KernelCaps::detect`] calls their own probes (`engine::uring::probe_io_uring()` and
//! `engine::aio::probe_linux_aio()`, same signature as the two functions below), and those two
//! functions are deleted.

use std::fmt;

use serde::Serialize;

/// Whether each native engine can run on this kernel, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelCaps {
    /// io_uring: Ok, or why not.
    #[serde(serialize_with = "availability")]
    pub io_uring: Result<(), String>,
    /// Linux native AIO (io_submit): Ok, or why not.
    #[serde(serialize_with = "availability")]
    pub linux_aio: Result<(), String>,
}

impl KernelCaps {
    /// Asks the kernel.
    pub fn detect() -> Self {
        KernelCaps {
            // Until the io_uring engine is merged, this build cannot use the ring the kernel
            // offers.
            io_uring: probe_io_uring()
                .and(Err("the io-uring engine is not in this build yet".into())),
            linux_aio: crate::engine::probe_linux_aio(),
        }
    }
}

/// `{"available": true}` or `{"available": false, "reason": "..."}`.
fn availability<S: serde::Serializer>(v: &Result<(), String>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(None)?;
    m.serialize_entry("available", &v.is_ok())?;
    if let Err(reason) = v {
        m.serialize_entry("reason", reason)?;
    }
    m.end()
}

impl fmt::Display for KernelCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |r: &Result<(), String>| match r {
            Ok(()) => "available".to_owned(),
            Err(why) => format!("unavailable: {why}"),
        };
        writeln!(f, "kernel")?;
        writeln!(f, "  io_uring:         {}", show(&self.io_uring))?;
        write!(f, "  linux-aio:        {}", show(&self.linux_aio))
    }
}

/// MERGE: replaced by `engine::uring::probe_io_uring`.
fn probe_io_uring() -> Result<(), String> {
    // Absent before Linux 6.6: then io_uring is allowed.
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .map(|s| s.trim().to_owned());
    if disabled.as_deref() == Some("2") {
        return Err("kernel.io_uring_disabled=2".into());
    }
    match io_uring::IoUring::new(4) {
        Ok(_) => Ok(()),
        Err(e) => Err(match (e.raw_os_error(), disabled.as_deref()) {
            (Some(libc::EPERM), Some("1")) => {
                "kernel.io_uring_disabled=1 and this process is not in kernel.io_uring_group".into()
            }
            (Some(libc::EPERM), _) => {
                "creating a ring is not permitted (EPERM: a seccomp or container policy?)".into()
            }
            (Some(libc::ENOSYS), _) => "the kernel has no io_uring (ENOSYS)".into(),
            _ => format!("creating a ring fails: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_agrees_with_the_sysctl() {
        let caps = KernelCaps::detect();
        let disabled =
            std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
        if disabled.trim() == "2" {
            assert_eq!(probe_io_uring(), Err("kernel.io_uring_disabled=2".into()));
        }
        let json = serde_json::to_value(&caps).unwrap();
        assert_eq!(json["io_uring"]["available"], caps.io_uring.is_ok());
        assert_eq!(json["linux_aio"]["available"], caps.linux_aio.is_ok());
        assert_eq!(
            json["linux_aio"].get("reason").is_some(),
            caps.linux_aio.is_err()
        );
    }
}
