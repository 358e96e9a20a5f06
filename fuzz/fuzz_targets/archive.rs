//! `image load` archives are untrusted: loading any bytes gives images or an error, never a
//! panic, and never touches anything outside the store (which lives alone in a fresh parent).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let parent = tempfile::tempdir().expect("temp dir");
    let root = parent.path().join("store");
    let store = container_image::ImageStore::open(&root).expect("store");
    let _ = store.load(container_image::Namespace::User(1000), data, &store.work_dir());
    let entries: Vec<_> = std::fs::read_dir(parent.path()).expect("list").collect();
    assert_eq!(entries.len(), 1, "a load wrote outside its store");
});
