//! crossgate-benches: the end-to-end comparison harness (`crossgate-bench`) and what the criterion benches
//! share. The harness measures crossgate, the direct path and the peers (Envoy, HAProxy, nginx, sniproxy) with
//! one load client, in one run, and reports medians beside the direct path and the best peer.
//! `crossgate-scale` (the [`scale`] module) measures discovery at mesh scale: the control service's pipeline in
//! process, crossgate-proxy gateways as child processes.

pub mod backend;
pub mod client;
pub mod harness;
pub mod report;
pub mod scale;
pub mod sys;
pub mod targets;
