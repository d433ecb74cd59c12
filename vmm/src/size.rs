//! Human sizes as dinv's options take them: `512M`, `64G`, `1024K`, `1048576` (bytes),
//! with an optional `B`/`iB` suffix and binary multiples.

/// Parses `s` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .or_else(|| t.strip_suffix(['B', 'b']))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("invalid size '{s}': unknown unit '{c}' (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("invalid size '{s}': expected a number with an optional K/M/G/T unit"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        for (s, v) in [("512M", 512u64 << 20), ("64G", 64 << 30), ("1k", 1024), ("4096", 4096), ("2GiB", 2 << 30), ("10MB", 10 << 20)] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
        for s in ["", "M", "12X", "-1G", "1.5G", "99999999999T"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }
}
