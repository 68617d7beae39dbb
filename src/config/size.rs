//! Byte sizes in the config: `"64MiB"`, `"512kB"`, `"1048576"` (bytes). Units are 1024-based,
//! as in Postgres's own settings (`kB`, `MB`, `GB`); `KiB`, `MiB`, `GiB` and `B` also work.

const UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("kB", 1 << 10),
    ("KiB", 1 << 10),
    ("MB", 1 << 20),
    ("MiB", 1 << 20),
    ("GB", 1 << 30),
    ("GiB", 1 << 30),
];

/// Parses a size; `None` for anything else (the caller names the key and the value).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let unit = unit.trim();
    let factor = if unit.is_empty() {
        1
    } else {
        UNITS.iter().find(|(name, _)| *name == unit)?.1
    };
    number.checked_mul(factor)
}

/// Formats a size with the largest binary unit that divides it: what [`parse_bytes`] reads.
pub fn format_bytes(bytes: u64) -> String {
    for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("64MiB"), Some(64 << 20));
        assert_eq!(parse_bytes("64 MB"), Some(64 << 20));
        assert_eq!(parse_bytes("512kB"), Some(512 << 10));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("10B"), Some(10));
        for bad in [
            "",
            "MiB",
            "5 parsecs",
            "-1MiB",
            "1.5MiB",
            "99999999999999999999GiB",
        ] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
        for n in [0, 1, 1000, 1 << 10, 3 << 20, 64 << 20, 2 << 30] {
            assert_eq!(parse_bytes(&format_bytes(n)), Some(n));
        }
        assert_eq!(format_bytes(64 << 20), "64MiB");
    }
}
