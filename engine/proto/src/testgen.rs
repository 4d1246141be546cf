//! Random topic filters for the property tests of the matchers (`index`,
//! `retain_tree`).

use quickcheck::{Arbitrary, Gen};

/// A valid plain filter of 1 to `max_levels` levels drawn from `levels`
/// (a `#` that would not be last becomes `+`; a single empty level, the
/// empty string, becomes "/").
pub fn filter(g: &mut Gen, levels: &[&str], max_levels: usize) -> String {
    let n = 1 + usize::arbitrary(g) % max_levels;
    let mut out: Vec<&str> = Vec::new();
    for i in 0..n {
        let mut level = *g.choose(levels).unwrap_or(&"a");
        if level == "#" && i + 1 < n {
            level = "+";
        }
        out.push(level);
    }
    let filter = out.join("/");
    if filter.is_empty() {
        "/".into()
    } else {
        filter
    }
}
