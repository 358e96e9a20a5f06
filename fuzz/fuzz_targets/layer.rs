//! Layer archives are untrusted: applying any bytes must never panic nor write outside the
//! root (the root is a fresh directory inside a fresh parent that must stay otherwise empty).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let parent = tempfile::tempdir().expect("temp dir");
    let root = parent.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let _ = container_image::unpack::layer::apply_layer(&root, data);
    let entries: Vec<_> = std::fs::read_dir(parent.path()).expect("list").collect();
    assert_eq!(entries.len(), 1, "a layer wrote outside its root");
});
