//! crossgate-benches: shared pieces of the benches (issue 5 adds the comparison harness).
