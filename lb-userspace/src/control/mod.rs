//! The control socket: the protocol, the agent's server, the CLI client,
//! the CLI commands and what they print.

pub mod cli;
pub mod client;
pub mod protocol;
pub mod server;
pub mod views;

pub use self::{
    client::call,
    protocol::{Admin, AnnounceStatus, BackendStatus, Health, ProbeStatus, Request, Response, ServiceStatus, Status},
    server::{ControlCall, bind, serve},
};
