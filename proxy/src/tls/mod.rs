//! TLS, read but never terminated: the gateway only looks at the ClientHello to route the connection.

pub mod hello;
