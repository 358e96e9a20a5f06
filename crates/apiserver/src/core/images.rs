//! Image requests: pull (streaming progress), list, inspect, tag, load, save, remove, registry
//! login and logout, through the [`Images`](super::ports::Images) port. The core adds what
//! only it knows: which images machines use, and who is asking.

use container_api::ApiError;
use container_api::image::{ImageDetail, ImageSummary, LoginRequest, PullEvent, RemoveReport};
use tokio::sync::mpsc;

use super::ports::{Bytes, InUse};
use super::{Caller, Core};

impl Core {
    pub(super) async fn image_list(&self) -> Result<Vec<ImageSummary>, ApiError> {
        self.state.images.list().await
    }

    pub(super) async fn image_inspect(&self, reference: String) -> Result<ImageDetail, ApiError> {
        self.state.images.inspect(&reference).await
    }

    pub(super) async fn image_tag(
        &self,
        source: String,
        target: String,
    ) -> Result<ImageSummary, ApiError> {
        self.state.images.tag(&source, &target).await
    }

    pub(super) async fn image_load(&self, archive: Bytes) -> Result<Vec<ImageSummary>, ApiError> {
        self.state.images.load(archive).await
    }

    pub(super) async fn image_save(&self, references: Vec<String>) -> Result<Bytes, ApiError> {
        if references.is_empty() {
            return Err(ApiError::invalid("name at least one image to save"));
        }
        self.state.images.save(references).await
    }

    /// Manifest digests in use by machines, with their names.
    fn images_in_use(&self) -> Result<InUse, ApiError> {
        let mut used = InUse::new();
        for m in self.state.machines.list()? {
            used.entry(m.image_digest).or_default().push(m.name);
        }
        Ok(used)
    }

    pub(super) async fn image_remove(
        &self,
        reference: String,
        force: bool,
    ) -> Result<RemoveReport, ApiError> {
        let in_use = self.images_in_use()?;
        self.state.images.remove(&reference, in_use, force).await
    }

    /// Pulls, reporting progress on `events`, ending with `Done` or `Error`.
    pub(super) async fn image_pull(
        &self,
        caller: &Caller,
        reference: String,
        events: mpsc::Sender<PullEvent>,
    ) {
        let result = self
            .state
            .images
            .pull(caller.uid, &reference, events.clone())
            .await;
        let last = match result {
            Ok(image) => PullEvent::Done { image },
            Err(error) => PullEvent::Error { error },
        };
        let _ = events.send(last).await;
    }

    pub(super) async fn registry_login(
        &self,
        caller: &Caller,
        req: LoginRequest,
    ) -> Result<(), ApiError> {
        self.state.images.login(caller.uid, req).await
    }

    pub(super) async fn registry_logout(
        &self,
        caller: &Caller,
        server: String,
    ) -> Result<(), ApiError> {
        if self.state.images.logout(caller.uid, &server).await? {
            Ok(())
        } else {
            Err(ApiError::not_found(
                "no stored credentials for that registry",
            ))
        }
    }
}
