//! crossgate-proxy (being built)
