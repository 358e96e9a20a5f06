//! `machine commit`: an image of a machine's filesystem, named among the caller's images. The
//! machine is booted when stopped (as `run` and `cp` are) and keeps running; its guest agent
//! streams a tar of the root filesystem alone (no /proc, /sys, /dev, /run or /tmp contents,
//! no shares: the host home and `--mount`s are not on the disk), which the image store turns
//! into a one-layer image with the machine's image's config. The filesystem is not frozen
//! meanwhile (a freeze blocks every writer in the guest, and a commit can take minutes): a
//! file written during the commit may be caught half-written, as with `docker commit
//! --pause=false`.
//!
//! Trust: the machine is resolved as the caller sees it (another user's is "not found") and
//! the name is written in the caller's own namespace only, so a commit can neither read
//! another user's machine nor replace another user's (or a system-wide) image.

use std::collections::BTreeMap;

use container_api::ApiError;
use container_api::image::ImageSummary;

use crate::core::ports::{Commit, Namespace};
use crate::core::{Caller, Core};

/// The label naming the machine an image was committed from.
pub const SOURCE_LABEL: &str = "org.container.machine.source";
/// The label holding the manifest digest of that machine's image.
pub const BASE_LABEL: &str = "org.container.machine.base";
/// The label holding the reference of that machine's image.
pub const BASE_NAME_LABEL: &str = "org.container.machine.base.name";

impl Core {
    /// Makes an image of machine `name`'s filesystem and names it `image` in the caller's
    /// namespace.
    pub(in crate::core) async fn machine_commit(
        &self,
        caller: &Caller,
        name: &str,
        image: &str,
    ) -> Result<ImageSummary, ApiError> {
        if image.trim().is_empty() {
            return Err(ApiError::invalid("name the image to commit to"));
        }
        let record = {
            let (_guard, record) = self.lock_visible(caller, name).await?;
            self.boot(&record).await?;
            record
        };
        let tar = self.state.vms.copy_root(name).await?;
        let commit = Commit {
            base: record.image_digest.clone(),
            reference: image.to_string(),
            labels: BTreeMap::from([
                (SOURCE_LABEL.to_string(), record.name.clone()),
                (BASE_LABEL.to_string(), record.image_digest.clone()),
                (BASE_NAME_LABEL.to_string(), record.image.clone()),
            ]),
            created_by: format!("container machine commit {}", record.name),
        };
        self.state
            .images
            .commit(Namespace::User(caller.uid), commit, tar)
            .await
    }
}
