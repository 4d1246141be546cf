//! Criterion suites live in `benches/` (see issue: criterion suites for every hot path).
