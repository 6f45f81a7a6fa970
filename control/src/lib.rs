//! crossgate-control: the control service (issue 3 fills this crate).
