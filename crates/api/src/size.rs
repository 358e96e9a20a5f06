//! Sizes as users type them (`512M`, `4G`, `64GiB`, `1073741824`) and as tables show them.
//! Units are binary, as in Apple's tool: `G`, `GB` and `GiB` all mean 2^30 bytes.

/// Parses a size; a bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "invalid size `{text}`: expected a number with an optional unit, e.g. 512M or 4G"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size `{text}`: number too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "invalid size `{text}`: unknown unit `{other}` (use K, M, G or T)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size `{text}`: too large"))
}

/// Formats bytes the way tables show them: `512M`, `4G`, `1.5G`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (unit, scale) in UNITS {
        if bytes >= scale {
            let value = bytes as f64 / scale as f64;
            return if (value - value.round()).abs() < 0.05 {
                format!("{}{unit}", value.round() as u64)
            } else {
                format!("{value:.1}{unit}")
            };
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("64GiB"), Ok(64 << 30));
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("2 GB"), Ok(2 << 30));
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert!(parse_size("").unwrap_err().contains("expected a number"));
        assert!(parse_size("G").unwrap_err().contains("expected a number"));
        assert!(parse_size("4X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("-1G").is_err());
        assert!(
            parse_size("99999999999999T")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn formats_round_and_fractional_sizes() {
        assert_eq!(format_size(4 << 30), "4G");
        assert_eq!(format_size(1536 << 20), "1.5G");
        assert_eq!(format_size(300), "300B");
    }
}
