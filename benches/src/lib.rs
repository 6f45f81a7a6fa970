//! crossgate-benches: the end-to-end comparison harness (`crossgate-bench`) and what the criterion benches
//! share. The harness measures crossgate, the direct path and the peers (Envoy, HAProxy, nginx, sniproxy) with
//! one load client, in one run, and reports medians beside the direct path and the best peer.

pub mod backend;
pub mod client;
pub mod harness;
pub mod report;
pub mod sys;
pub mod targets;
