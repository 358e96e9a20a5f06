//! Manifests, indexes and image configs from registries and archives are untrusted.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = container_image::manifest::parse(data);
    let _ = container_image::manifest::parse_config(data);
});
