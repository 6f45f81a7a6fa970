//! What both crossgate binaries share around their main job (issue #15: one admin HTTP loop, one process
//! set-up): listeners bounded in connections whose accept loop pauses on errors instead of spinning
//! ([`accept`]), the HTTP side doors served on them ([`http`]), and logging and signals ([`process`]).

pub mod accept;
pub mod http;
pub mod process;
#[cfg(feature = "testing")]
pub mod testing;

pub use accept::{Incoming, RateLimited, bind_shared};
pub use http::Limits;
