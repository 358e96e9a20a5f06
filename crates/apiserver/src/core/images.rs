//! Image requests: pull (streaming progress), list, inspect, tag, remove, registry login and
//! logout. Pull also builds the image's base disk, so `inspect` can say whether the image
//! has `/sbin/init` before anyone tries to boot it.

use std::collections::BTreeMap;
use std::sync::Arc;

use container_api::image::{
    BaseDiskInfo, ImageDetail, ImageSummary, LayerInfo, LoginRequest, PullEvent, RemoveReport,
};
use container_api::{ApiError, ErrorKind};
use container_image::{ImageError, ImageRecord, ImageStore, Progress, PullOptions};
use tokio::sync::mpsc;

use super::ports::{ImageInfo, Images};
use super::{Caller, Core};

/// An image store error as the API reports it.
pub(super) fn api_error(e: ImageError) -> ApiError {
    {
        let kind = match &e {
            ImageError::NotFound(_) => ErrorKind::NotFound,
            ImageError::InvalidReference { .. } | ImageError::InvalidDigest(_) => {
                ErrorKind::InvalidArgument
            }
            ImageError::Unauthorized { .. } => ErrorKind::PermissionDenied,
            ImageError::InUse { .. } => ErrorKind::Conflict,
            ImageError::Registry { message, .. } if message.contains("not found") => {
                ErrorKind::NotFound
            }
            ImageError::Registry { .. }
            | ImageError::DigestMismatch { .. }
            | ImageError::SizeMismatch { .. }
            | ImageError::Malformed { .. }
            | ImageError::TooLarge { .. }
            | ImageError::NoPlatform(_)
            | ImageError::UnsupportedMediaType(_)
            | ImageError::UnsafeEntry { .. }
            | ImageError::Archive { .. } => ErrorKind::Unavailable,
            ImageError::Apply { .. } | ImageError::Mkfs(_) | ImageError::Io { .. } => {
                ErrorKind::Internal
            }
        };
        ApiError::with_chain(kind, &e)
    }
}

pub(super) fn summary(r: &ImageRecord) -> ImageSummary {
    ImageSummary {
        reference: r.reference.clone(),
        digest: r.digest.clone(),
        size: r.size,
        created: r.config.created,
        has_init: r.disk.as_ref().map(|(_, d)| d.has_init),
    }
}

pub(super) fn detail(r: &ImageRecord) -> ImageDetail {
    ImageDetail {
        references: r.references.clone(),
        digest: r.digest.clone(),
        media_type: r.media_type.clone(),
        os: r.config.os.clone(),
        architecture: r.config.architecture.clone(),
        size: r.size,
        created: r.config.created,
        has_init: r.disk.as_ref().map(|(_, d)| d.has_init),
        stop_signal: r.config.stop_signal.clone(),
        layers: r
            .layers
            .iter()
            .map(|l| LayerInfo {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
            })
            .collect(),
        config: r.config.config.clone(),
        base_disk: r.disk.as_ref().map(|(p, _)| BaseDiskInfo {
            path: p.display().to_string(),
            allocated: container_image::unpack::allocated_bytes(p),
        }),
    }
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("image store task failed: {e}")))?
        .map_err(api_error)
}

/// The machine core's view of the real store.
#[derive(Debug)]
pub struct StoreImages(pub Arc<ImageStore>);

#[async_trait::async_trait]
impl Images for StoreImages {
    async fn prepare(&self, reference: &str) -> Result<ImageInfo, ApiError> {
        let store = self.0.clone();
        let reference = reference.to_string();
        blocking(move || {
            let record = store.inspect(&reference)?;
            let (disk, info) = store.base_disk(&record.digest)?;
            Ok(ImageInfo {
                reference: record.reference,
                digest: record.digest,
                has_init: info.has_init,
                stop_signal: record.config.stop_signal,
                base_disk: disk,
            })
        })
        .await
    }
}

impl Core {
    fn store(&self) -> Arc<ImageStore> {
        self.state.store.clone()
    }

    pub(super) async fn image_list(&self) -> Result<Vec<ImageSummary>, ApiError> {
        let store = self.store();
        blocking(move || Ok(store.list()?.iter().map(summary).collect())).await
    }

    pub(super) async fn image_inspect(&self, reference: String) -> Result<ImageDetail, ApiError> {
        let store = self.store();
        blocking(move || Ok(detail(&store.inspect(&reference)?))).await
    }

    pub(super) async fn image_tag(
        &self,
        source: String,
        target: String,
    ) -> Result<ImageSummary, ApiError> {
        let store = self.store();
        blocking(move || Ok(summary(&store.tag(&source, &target)?))).await
    }

    /// Loads an archive streamed by the client (spooled to disk: the tar reader is sync).
    pub(super) async fn image_load(
        &self,
        mut archive: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<Vec<ImageSummary>, ApiError> {
        let store = self.store();
        let work = store.work_dir();
        let spool = tempfile::tempfile_in(&work)
            .map_err(|e| ApiError::internal(format!("spooling the archive: {e}")))?;
        let mut file = tokio::fs::File::from_std(spool);
        tokio::io::copy(&mut archive, &mut file)
            .await
            .map_err(|e| ApiError::invalid(format!("reading the archive: {e}")))?;
        let mut spool = file.into_std().await;
        blocking(move || {
            std::io::Seek::rewind(&mut spool).map_err(container_image::ImageError::io(&work))?;
            let loaded = store.load(std::io::BufReader::new(spool), &work)?;
            for r in &loaded {
                store.base_disk(&r.digest)?;
            }
            loaded
                .iter()
                .map(|r| Ok(summary(&store.inspect(&r.reference)?)))
                .collect()
        })
        .await
    }

    /// Writes an OCI-layout archive to a temporary file and hands back a reader of it.
    pub(super) async fn image_save(
        &self,
        references: Vec<String>,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, ApiError> {
        if references.is_empty() {
            return Err(ApiError::invalid("name at least one image to save"));
        }
        let store = self.store();
        let file = blocking(move || {
            let work = store.work_dir();
            let mut file =
                tempfile::tempfile_in(&work).map_err(container_image::ImageError::io(&work))?;
            store.save(&references, &mut file)?;
            std::io::Seek::rewind(&mut file).map_err(container_image::ImageError::io(&work))?;
            Ok(file)
        })
        .await?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    /// Manifest digests in use by machines, with their names.
    fn images_in_use(&self) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
        let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
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
        let store = self.store();
        blocking(move || {
            let r = store.remove(&reference, &in_use, force)?;
            Ok(RemoveReport {
                untagged: r.untagged,
                deleted: r.deleted,
                freed_bytes: r.freed_bytes,
            })
        })
        .await
    }

    /// Pulls, reporting progress on `events`, ending with `Done` or `Error`.
    pub(super) async fn image_pull(
        &self,
        caller: &Caller,
        reference: String,
        events: mpsc::Sender<PullEvent>,
    ) {
        let result = self.pull_inner(caller, &reference, &events).await;
        let last = match result {
            Ok(image) => PullEvent::Done { image },
            Err(error) => PullEvent::Error { error },
        };
        let _ = events.send(last).await;
    }

    async fn pull_inner(
        &self,
        caller: &Caller,
        reference: &str,
        events: &mpsc::Sender<PullEvent>,
    ) -> Result<ImageSummary, ApiError> {
        let registry = &self.state.config.registry;
        let opts = PullOptions {
            insecure: registry.insecure.clone(),
            max_concurrent_downloads: registry.max_concurrent_downloads as usize,
            uid: caller.uid,
        };
        let tx = events.clone();
        let report = move |p: Progress| {
            let event = match p {
                Progress::Resolved { digest, layers } => PullEvent::Resolved { digest, layers },
                Progress::Bytes {
                    digest,
                    current,
                    total,
                } => PullEvent::Progress {
                    digest,
                    current,
                    total,
                },
                Progress::BlobDone { digest, cached } => PullEvent::BlobDone { digest, cached },
                Progress::Step(message) => PullEvent::Step { message },
            };
            // A slow or gone client must not stall the pull.
            let _ = tx.try_send(event);
        };
        let record = self
            .store()
            .pull(reference, &opts, &report)
            .await
            .map_err(api_error)?;
        let store = self.store();
        let digest = record.digest.clone();
        let name = record.reference.clone();
        blocking(move || {
            store.base_disk(&digest)?;
            Ok(summary(&store.inspect(&name)?))
        })
        .await
    }

    pub(super) async fn registry_login(
        &self,
        caller: &Caller,
        req: LoginRequest,
    ) -> Result<(), ApiError> {
        self.store()
            .credentials(caller.uid)
            .login(
                &req.server,
                &req.username,
                &req.password,
                &self.state.config.registry.insecure,
            )
            .await
            .map_err(api_error)
    }

    pub(super) async fn registry_logout(
        &self,
        caller: &Caller,
        server: String,
    ) -> Result<(), ApiError> {
        let creds = self.store().credentials(caller.uid);
        let had = blocking(move || creds.logout(&server)).await?;
        if had {
            Ok(())
        } else {
            Err(ApiError::not_found(
                "no stored credentials for that registry",
            ))
        }
    }
}
