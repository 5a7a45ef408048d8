//! vublk: a userspace virtio-blk backend (vhost-user-blk server).
//!
//! Layers, from the guest inwards: [`server`] accepts vhost-user connections and handles
//! signals; [`vhost_user`] is the thin glue that runs one worker per virtqueue; [`blk`] is the
//! virtio-blk device model (parse, config space, status); [`engine`] moves data between guest
//! buffers and the [`backing`] file or block device. [`probe`] finds out what a backing is,
//! [`caps`] what the kernel allows, and [`policy`] picks each export's engine from both.
//! [`bench`](mod@bench) is a VM-less load generator and data verifier for any
//! vhost-user-blk backend. [`attach`] renders what QEMU and libvirt need to attach an export,
//! and [`readiness`] tells a service manager (systemd, a pid file) that vublk serves.

pub mod attach;
pub mod backing;
pub mod bench;
pub mod blk;
pub mod caps;
pub mod engine;
pub mod export;
pub mod policy;
pub mod probe;
pub mod ratelimit;
pub mod readiness;
pub mod server;
pub mod vhost_user;
