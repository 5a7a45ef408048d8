//! How a frontend attaches an export: the QEMU arguments, the libvirt `<disk>` element (and a
//! minimal domain around it), and the capabilities object of QEMU's vhost-user backend
//! conventions. Everything here is pure text rendering.

use std::fmt::Write as _;
use std::path::PathBuf;

/// What a frontend needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    /// The export's vhost-user socket.
    pub socket: PathBuf,
    /// Virtqueues the frontend should use (the export's `--queues`).
    pub queues: u16,
    /// Virtqueue size the frontend should use (the export's `--queue-size`).
    pub queue_size: u16,
    /// The serial the guest will see, when known before the export opens.
    pub serial: Option<String>,
    /// The export is read-only.
    pub read_only: bool,
    /// Guest RAM in bytes: the size of the shared memory backend.
    pub memory: u64,
    /// The guest's device name in libvirt (`vda`, `vdb`, ...).
    pub target_dev: String,
    /// QEMU id of the chardev (the device is named after it).
    pub id: String,
}

/// The vhost-user backend program conventions' capabilities object for vublk: a block
/// backend that implements the `--read-only` and `--blk-file` options.
pub fn capabilities() -> String {
    #[derive(serde::Serialize)]
    struct Capabilities {
        #[serde(rename = "type")]
        kind: &'static str,
        features: [&'static str; 2],
    }
    let caps = Capabilities {
        kind: "block",
        features: ["read-only", "blk-file"],
    };
    serde_json::to_string_pretty(&caps).expect("plain strings serialize")
}

/// A size as QEMU writes it: the largest binary unit that divides it exactly.
pub fn qemu_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A value inside a QEMU `key=value,...` option: commas are doubled.
fn qemu_value(s: &str) -> String {
    s.replace(',', ",,")
}

/// Id of the shared guest memory object.
const MEMORY_ID: &str = "mem";

/// The QEMU arguments that attach the export, one argument per element (unquoted: give them
/// to `execve` as they are, or print one per line for `mapfile -t`).
pub fn qemu_args(spec: &AttachSpec) -> Vec<String> {
    let id = qemu_value(&spec.id);
    vec![
        "-object".into(),
        format!(
            "memory-backend-memfd,id={MEMORY_ID},size={},share=on",
            qemu_size(spec.memory)
        ),
        "-machine".into(),
        format!("memory-backend={MEMORY_ID}"),
        "-chardev".into(),
        format!(
            "socket,id={id},path={},reconnect-ms=1000",
            qemu_value(&spec.socket.to_string_lossy())
        ),
        "-device".into(),
        format!(
            "vhost-user-blk-pci,chardev={id},num-queues={},queue-size={}",
            spec.queues, spec.queue_size
        ),
    ]
}

/// The QEMU arguments as a shell-style continuation block (for people, not scripts): each
/// option with its value on one line.
pub fn qemu_command_lines(spec: &AttachSpec) -> String {
    let args = qemu_args(spec);
    args.chunks(2)
        .map(|pair| pair.join(" "))
        .collect::<Vec<_>>()
        .join(" \\\n  ")
}

/// Escapes text for an XML attribute (quoted with `'`) or element content.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Text that is safe inside an XML comment (`--` may not appear, nor a trailing `-`).
fn comment_safe(s: &str) -> bool {
    !s.contains("--") && !s.ends_with('-') && !s.contains(['<', '>', '&'])
}

/// The libvirt `<disk type='vhostuser'>` element, indented by `indent` spaces.
///
/// libvirt refuses `<serial>` and `<readonly/>` on vhostuser disks (the backend, not QEMU,
/// defines them), so the serial and read-only mode appear as a comment only.
pub fn libvirt_disk(spec: &AttachSpec, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut x = String::new();
    let mut line = |s: &str| {
        let _ = writeln!(x, "{pad}{s}");
    };
    line("<disk type='vhostuser' device='disk'>");
    line(&format!(
        "  <driver name='qemu' type='raw' queues='{}' queue_size='{}'/>",
        spec.queues, spec.queue_size
    ));
    line(&format!(
        "  <source type='unix' path='{}'>",
        xml_escape(&spec.socket.to_string_lossy())
    ));
    line("    <reconnect enabled='yes' timeout='1'/>");
    line("  </source>");
    line(&format!(
        "  <target dev='{}' bus='virtio'/>",
        xml_escape(&spec.target_dev)
    ));
    if let Some(note) = backend_note(spec) {
        line(&format!("  <!-- {note} -->"));
    }
    line("</disk>");
    x
}

/// What vublk itself sets for the guest that libvirt cannot express.
fn backend_note(spec: &AttachSpec) -> Option<String> {
    let serial = spec.serial.as_ref().map(|s| {
        if comment_safe(s) {
            format!("serial {s}")
        } else {
            "its serial".to_string()
        }
    });
    let what = match (serial, spec.read_only) {
        (Some(s), true) => format!("{s}, read-only"),
        (Some(s), false) => s,
        (None, true) => "read-only".to_string(),
        (None, false) => return None,
    };
    Some(format!(
        "set by vublk: {what} (libvirt accepts no serial or readonly element on vhostuser disks)"
    ))
}

/// A minimal complete libvirt domain with shared memfd memory and the disk: for tests and as
/// a starting point.
pub fn libvirt_domain(spec: &AttachSpec, name: &str) -> String {
    let kib = spec.memory.div_ceil(1024);
    format!(
        "<domain type='kvm'>\n  \
           <name>{}</name>\n  \
           <memory unit='KiB'>{kib}</memory>\n  \
           <memoryBacking>\n    \
             <source type='memfd'/>\n    \
             <access mode='shared'/>\n  \
           </memoryBacking>\n  \
           <vcpu>{}</vcpu>\n  \
           <os>\n    \
             <type arch='x86_64' machine='q35'>hvm</type>\n  \
           </os>\n  \
           <devices>\n\
         {}  \
           </devices>\n\
         </domain>\n",
        xml_escape(name),
        spec.queues,
        libvirt_disk(spec, 4)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AttachSpec {
        AttachSpec {
            socket: "/run/vublk/vm1.sock".into(),
            queues: 4,
            queue_size: 128,
            serial: Some("vm1-disk0".into()),
            read_only: false,
            memory: 2 << 30,
            target_dev: "vdb".into(),
            id: "vublk0".into(),
        }
    }

    #[test]
    fn capabilities_follow_the_schema() {
        let text = capabilities();
        assert!(
            text.trim_start().starts_with("{\n  \"type\": \"block\""),
            "{text}"
        );
        let c: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(c["type"], "block");
        let features: Vec<&str> = c["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        // The only block features vhost-user.json defines; vublk has both options.
        assert_eq!(features, ["read-only", "blk-file"]);
        assert_eq!(c.as_object().unwrap().len(), 2);
    }

    #[test]
    fn qemu_sizes() {
        assert_eq!(qemu_size(1 << 30), "1G");
        assert_eq!(qemu_size(1536 << 20), "1536M");
        assert_eq!(qemu_size(4 << 40), "4T");
        assert_eq!(qemu_size(12 << 10), "12K");
        assert_eq!(qemu_size(1000), "1000");
    }

    #[test]
    fn qemu_arguments() {
        assert_eq!(
            qemu_args(&spec()),
            [
                "-object",
                "memory-backend-memfd,id=mem,size=2G,share=on",
                "-machine",
                "memory-backend=mem",
                "-chardev",
                "socket,id=vublk0,path=/run/vublk/vm1.sock,reconnect-ms=1000",
                "-device",
                "vhost-user-blk-pci,chardev=vublk0,num-queues=4,queue-size=128",
            ]
        );
        let mut s = spec();
        s.socket = "/tmp/a,b.sock".into();
        assert!(qemu_args(&s)[5].contains("path=/tmp/a,,b.sock,reconnect-ms"));
        let lines = qemu_command_lines(&spec());
        assert_eq!(lines.lines().count(), 4);
        assert!(lines.starts_with("-object memory-backend-memfd,"));
        assert!(lines.contains(" \\\n  -device vhost-user-blk-pci,"));
    }

    #[test]
    fn libvirt_disk_element() {
        let d = libvirt_disk(&spec(), 0);
        assert_eq!(
            d,
            "<disk type='vhostuser' device='disk'>\n  \
               <driver name='qemu' type='raw' queues='4' queue_size='128'/>\n  \
               <source type='unix' path='/run/vublk/vm1.sock'>\n    \
                 <reconnect enabled='yes' timeout='1'/>\n  \
               </source>\n  \
               <target dev='vdb' bus='virtio'/>\n  \
               <!-- set by vublk: serial vm1-disk0 (libvirt accepts no serial or readonly element \
                    on vhostuser disks) -->\n\
             </disk>\n"
        );
        assert!(!d.contains("<serial>") && !d.contains("<readonly/>"));
    }

    #[test]
    fn libvirt_notes_and_escaping() {
        let mut s = spec();
        s.serial = None;
        assert!(!libvirt_disk(&s, 0).contains("<!--"));
        s.read_only = true;
        assert!(libvirt_disk(&s, 0).contains("<!-- set by vublk: read-only ("));
        s.serial = Some("a--b".into());
        let d = libvirt_disk(&s, 0);
        assert!(d.contains("set by vublk: its serial, read-only"), "{d}");
        assert!(!d.contains("a--b"));
        s.socket = "/tmp/<x>&'y'.sock".into();
        s.target_dev = "vd'c".into();
        let d = libvirt_disk(&s, 2);
        assert!(
            d.contains("path='/tmp/&lt;x&gt;&amp;&apos;y&apos;.sock'"),
            "{d}"
        );
        assert!(d.contains("dev='vd&apos;c'"));
        assert!(
            d.lines()
                .all(|l| l.starts_with("  <") || l.starts_with("    ")),
            "{d}"
        );
        assert_eq!(xml_escape("a\"b"), "a&quot;b");
    }

    #[test]
    fn libvirt_domain_wraps_the_disk() {
        let d = libvirt_domain(&spec(), "vm<1>");
        assert!(d.starts_with("<domain type='kvm'>\n  <name>vm&lt;1&gt;</name>\n"));
        assert!(d.contains("<memory unit='KiB'>2097152</memory>"));
        assert!(d.contains("<source type='memfd'/>\n    <access mode='shared'/>"));
        assert!(d.contains(&libvirt_disk(&spec(), 4)));
        assert!(d.ends_with("    </disk>\n  </devices>\n</domain>\n"), "{d}");
    }
}
