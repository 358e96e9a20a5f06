//! Request bodies of the service's API, as any local user can send them: garbage is an
//! error, never a panic, and whatever parses serialises back to a body that parses the same.
#![no_main]
use container_api::image::{LoginRequest, PullRequest, PushRequest, TagRequest};
use container_api::machine::{
    CloneRequest, CommitRequest, CreateRequest, RenameRequest, RunRequest, SetRequest,
    SnapshotCreateRequest, SnapshotRestoreRequest, StopRequest,
};
use container_api::system::KernelSetRequest;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned>(data: &[u8]) {
    if let Ok(body) = serde_json::from_slice::<T>(data) {
        let again = serde_json::to_vec(&body).expect("a parsed body serialises");
        let reparsed: T = serde_json::from_slice(&again).expect("a serialised body parses");
        assert_eq!(
            serde_json::to_value(&reparsed).unwrap(),
            serde_json::to_value(&body).unwrap()
        );
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    round_trip::<CreateRequest>(data);
    round_trip::<RunRequest>(data);
    round_trip::<SetRequest>(data);
    round_trip::<StopRequest>(data);
    round_trip::<CloneRequest>(data);
    round_trip::<CommitRequest>(data);
    round_trip::<RenameRequest>(data);
    round_trip::<SnapshotCreateRequest>(data);
    round_trip::<SnapshotRestoreRequest>(data);
    round_trip::<TagRequest>(data);
    round_trip::<PullRequest>(data);
    round_trip::<PushRequest>(data);
    round_trip::<LoginRequest>(data);
    round_trip::<KernelSetRequest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        // What the CLI turns into a SetRequest, and sizes the service reads from config.
        let _ = SetRequest::parse(&text.split(' ').collect::<Vec<_>>());
        let _ = container_api::size::parse_size(text);
    }
});
