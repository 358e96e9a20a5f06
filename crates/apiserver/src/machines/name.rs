//! Machine names: DNS labels (`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`, at most 57 characters, the
//! limit Apple's tool uses so derived host names fit), and the default name derived from an
//! image reference (`alpine:latest` → `alpine-latest`), made valid rather than refused.

/// Longest machine name.
pub const MAX_NAME: usize = 57;

/// Checks a user-given name.
pub fn validate(name: &str) -> Result<(), String> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if name.is_empty()
        || name.len() > MAX_NAME
        || !valid_chars
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "invalid machine name `{name}`: use 1 to {MAX_NAME} lowercase letters, digits and dashes; it must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// The default name for a machine created from `image`.
pub fn from_image(image: &str) -> String {
    let (repo, tag) = match image.split_once('@') {
        Some((repo, digest)) => (
            repo,
            digest
                .split_once(':')
                .map(|(_, hex)| hex)
                .unwrap_or(digest)
                .get(..12)
                .unwrap_or(digest),
        ),
        None => match image.rfind(':') {
            Some(i) if !image[i..].contains('/') => (&image[..i], &image[i + 1..]),
            _ => (image, "latest"),
        },
    };
    let last = repo.rsplit('/').next().unwrap_or(repo);
    let raw = format!("{last}-{tag}").to_ascii_lowercase();
    let mut name = String::new();
    for c in raw.chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && name.ends_with('-')) {
            name.push(c);
        }
    }
    let name: String = name.trim_matches('-').chars().take(MAX_NAME).collect();
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        "machine".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn derives_names_like_apple_and_fixes_dots() {
        assert_eq!(from_image("alpine:latest"), "alpine-latest");
        assert_eq!(from_image("alpine"), "alpine-latest");
        assert_eq!(from_image("alpine:3.22"), "alpine-3-22");
        assert_eq!(from_image("127.0.0.1:5000/tests/debian:12"), "debian-12");
        assert_eq!(from_image("x/Ubuntu_Dev:24.04"), "ubuntu-dev-24-04");
        assert_eq!(
            from_image("r/x@sha256:0123456789abcdef0123"),
            "x-0123456789ab"
        );
    }

    #[test]
    fn validates_names() {
        assert!(validate("dev").is_ok());
        assert!(validate("a").is_ok());
        assert!(validate("my-box-2").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(58)] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn derived_names_are_always_valid(image in ".{0,120}") {
            let name = from_image(&image);
            prop_assert!(validate(&name).is_ok(), "{image:?} -> {name:?}");
        }
    }
}
