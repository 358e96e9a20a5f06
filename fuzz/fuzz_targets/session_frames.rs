//! Frames of a `run`/`cp` session on the upgraded API connection, as a client sends them:
//! garbage ends the session with an error, never a panic or an unbounded allocation.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    futures::executor::block_on(async {
        let mut r = data;
        while let Ok(Some(_)) = container_api::session::Frame::read(&mut r).await {}
    });
});
