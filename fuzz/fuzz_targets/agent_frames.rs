//! Frames between the service and the guest agent: garbage from either side is an error.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(Some(_)) = container_agent_proto::sync::read(&mut r) {}
});
