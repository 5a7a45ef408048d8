//! What the running kernel lets vublk use: io_uring, Linux native AIO, and transparent huge
//! pages for the bounce buffers of large O_DIRECT transfers.
//!
//! Each engine probes for itself; this gathers the answers for the policy and `vublk probe`.

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
    /// Transparent huge pages for the huge-page bounce buffers (see
    /// [`crate::engine::huge_arena`]): Ok, or why not.
    #[serde(serialize_with = "availability")]
    pub huge_pages: Result<(), String>,
}

impl KernelCaps {
    /// Asks the kernel.
    pub fn detect() -> Self {
        KernelCaps {
            io_uring: crate::engine::probe_io_uring(),
            linux_aio: crate::engine::probe_linux_aio(),
            // The real thing, once: whether the kernel hands out huge pages now.
            huge_pages: crate::engine::huge_arena::HugeMapping::new().map(drop),
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
        writeln!(f, "  linux-aio:        {}", show(&self.linux_aio))?;
        let huge = match &self.huge_pages {
            Ok(()) => "available (bounce buffers for O_DIRECT transfers of 16 KiB and more)".into(),
            Err(why) => format!("unavailable: {why} (large transfers go straight from guest RAM)"),
        };
        write!(f, "  huge pages:       {huge}")
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
            let reason = caps.io_uring.as_ref().unwrap_err();
            assert!(reason.contains("io_uring_disabled"), "{reason}");
        }
        let json = serde_json::to_value(&caps).unwrap();
        assert_eq!(json["io_uring"]["available"], caps.io_uring.is_ok());
        assert_eq!(json["linux_aio"]["available"], caps.linux_aio.is_ok());
        // vublk's own tests need transparent huge pages (the huge_arena tests say so).
        assert_eq!(json["huge_pages"]["available"], true, "{json}");
        assert!(
            caps.to_string().contains("huge pages:       available"),
            "{caps}"
        );
        assert_eq!(
            json["linux_aio"].get("reason").is_some(),
            caps.linux_aio.is_err()
        );
    }
}
