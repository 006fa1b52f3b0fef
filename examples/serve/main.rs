//! The example embedding server (being built).

fn main() {}
