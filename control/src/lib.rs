//! crossgate-control: the control service (issue 3 fills this crate).

#[cfg(any(test, feature = "testing"))]
pub mod fake_kube;
