//! Manifests, indexes, image configs and references from registries and archives are
//! untrusted: any bytes give a value or an error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(container_image::manifest::Parsed::Index(index)) =
        container_image::manifest::parse(data)
    {
        let _ = container_image::manifest::pick_platform(&index);
    }
    let _ = container_image::manifest::parse_config(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = container_image::parse_reference(text);
    }
});
