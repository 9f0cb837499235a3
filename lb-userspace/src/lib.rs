//! xdplb agent library: configuration, Maglev, reconcile and the kernel edges.
//! The `xdplb` binary is a thin CLI over it; tests use it directly.
pub mod agent;
pub mod config;
pub mod dataplane;
pub mod maglev;
pub mod netlink;
pub mod reconcile;
