//! The core's [`Images`] port bound to the OCI image store (`container_image`): store work
//! runs off the async threads, store errors become API errors with their cause chain, and
//! pulls and loads build the image's base disk so `inspect` can say whether it has
//! `/sbin/init` before anyone tries to boot it. The port's namespaces are the store's: names
//! per uid and the system-wide ones; blobs and base disks shared by digest.

use std::sync::Arc;

use async_trait::async_trait;
use container_api::image::{
    BaseDiskInfo, ImageDetail, ImageSource, ImageSummary, LayerInfo, LoginRequest, PullEvent,
    RemoveReport,
};
use container_api::{ApiError, ErrorKind};
use container_image::Namespace as StoreNamespace;
use container_image::{ImageError, ImageRecord, ImageStore, Progress, PullOptions};
use tokio::sync::mpsc;

use crate::config::RegistryConfig;
use crate::core::ports::{
    Bytes, Commit, ImageHold, ImageInfo, ImageUsage, Images, InUse, Namespace,
};

/// The image store with the registry settings pulls and logins use.
#[derive(Debug)]
pub struct StoreImages {
    store: Arc<ImageStore>,
    registry: RegistryConfig,
}

impl StoreImages {
    pub fn new(store: Arc<ImageStore>, registry: RegistryConfig) -> Self {
        StoreImages { store, registry }
    }
}

/// The store's namespace for the port's.
fn store_ns(ns: Namespace) -> StoreNamespace {
    match ns {
        Namespace::User(uid) => StoreNamespace::User(uid),
        Namespace::System => StoreNamespace::System,
    }
}

/// An image store error as the API reports it.
fn api_error(e: ImageError) -> ApiError {
    ApiError::with_chain(kind_of(&e), &e)
}

/// The API's kind of an image store error.
fn kind_of(e: &ImageError) -> ErrorKind {
    match e {
        ImageError::NotFound(_) | ImageError::RemoteNotFound { .. } => ErrorKind::NotFound,
        ImageError::InvalidReference { .. } | ImageError::InvalidDigest(_) => {
            ErrorKind::InvalidArgument
        }
        ImageError::Unauthorized { .. } | ImageError::SystemImage(_) => ErrorKind::PermissionDenied,
        // As the registry's own answer, the last one tried, says.
        ImageError::AllSourcesFailed { source, .. } => kind_of(source),
        ImageError::InUse { .. } => ErrorKind::Conflict,
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
    }
}

fn summary(r: &ImageRecord) -> ImageSummary {
    ImageSummary {
        reference: r.reference.clone(),
        digest: r.digest.clone(),
        size: r.size,
        created: r.config.created,
        has_init: r.disk.as_ref().map(|(_, d)| d.has_init),
        owner: match r.namespace {
            StoreNamespace::User(uid) => Some(uid),
            StoreNamespace::System => None,
        },
    }
}

fn detail(r: &ImageRecord) -> ImageDetail {
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
        source: r.source.as_ref().map(|s| ImageSource {
            reference: s.reference.clone(),
            mirror: s.mirror,
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

/// A pull's progress as the API streams it.
fn pull_event(p: Progress) -> PullEvent {
    match p {
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
    }
}

#[async_trait]
impl Images for StoreImages {
    async fn list(&self, ns: Namespace) -> Result<Vec<ImageSummary>, ApiError> {
        let store = self.store.clone();
        blocking(move || Ok(store.list(store_ns(ns))?.iter().map(summary).collect())).await
    }

    async fn list_all(&self) -> Result<Vec<ImageSummary>, ApiError> {
        let store = self.store.clone();
        blocking(move || Ok(store.list_all()?.iter().map(summary).collect())).await
    }

    async fn inspect(&self, ns: Namespace, reference: &str) -> Result<ImageDetail, ApiError> {
        let (store, reference) = (self.store.clone(), reference.to_string());
        blocking(move || Ok(detail(&store.inspect(store_ns(ns), &reference)?))).await
    }

    async fn tag(
        &self,
        ns: Namespace,
        source: &str,
        target: &str,
    ) -> Result<ImageSummary, ApiError> {
        let store = self.store.clone();
        let (source, target) = (source.to_string(), target.to_string());
        blocking(move || Ok(summary(&store.tag(store_ns(ns), &source, &target)?))).await
    }

    async fn pull(
        &self,
        uid: u32,
        ns: Namespace,
        reference: &str,
        events: mpsc::Sender<PullEvent>,
    ) -> Result<ImageSummary, ApiError> {
        let opts = PullOptions {
            insecure: self.registry.insecure.clone(),
            mirrors: self.registry.mirrors.clone(),
            max_concurrent_downloads: self.registry.max_concurrent_downloads as usize,
            uid,
        };
        // A slow or gone client must not stall the pull.
        let report = move |p: Progress| {
            let _ = events.try_send(pull_event(p));
        };
        let ns = store_ns(ns);
        let record = self
            .store
            .pull(ns, reference, &opts, &report)
            .await
            .map_err(api_error)?;
        let store = self.store.clone();
        blocking(move || {
            store.base_disk(ns, &record.digest)?;
            Ok(summary(&store.inspect(ns, &record.reference)?))
        })
        .await
    }

    async fn push(
        &self,
        uid: u32,
        ns: Namespace,
        reference: &str,
        events: mpsc::Sender<PullEvent>,
    ) -> Result<ImageSummary, ApiError> {
        let opts = PullOptions {
            insecure: self.registry.insecure.clone(),
            uid,
            ..PullOptions::default()
        };
        let report = move |p: Progress| {
            let _ = events.try_send(pull_event(p));
        };
        let record = self
            .store
            .push(store_ns(ns), reference, &opts, &report)
            .await
            .map_err(api_error)?;
        Ok(summary(&record))
    }

    /// Spools the archive to disk first: the tar reader is synchronous.
    async fn load(&self, ns: Namespace, mut archive: Bytes) -> Result<Vec<ImageSummary>, ApiError> {
        let ns = store_ns(ns);
        let store = self.store.clone();
        let work = store.work_dir();
        let spool = tempfile::tempfile_in(&work)
            .map_err(|e| ApiError::internal(format!("spooling the archive: {e}")))?;
        let mut file = tokio::fs::File::from_std(spool);
        tokio::io::copy(&mut archive, &mut file)
            .await
            .map_err(|e| ApiError::invalid(format!("reading the archive: {e}")))?;
        let mut spool = file.into_std().await;
        blocking(move || {
            std::io::Seek::rewind(&mut spool).map_err(ImageError::io(&work))?;
            let loaded = store.load(ns, std::io::BufReader::new(spool), &work)?;
            for r in &loaded {
                store.base_disk(ns, &r.digest)?;
            }
            loaded
                .iter()
                .map(|r| Ok(summary(&store.inspect(ns, &r.reference)?)))
                .collect()
        })
        .await
    }

    /// Streams the tar through the (blocking) store: nothing is spooled uncompressed.
    async fn commit(
        &self,
        ns: Namespace,
        commit: Commit,
        tar: Bytes,
    ) -> Result<ImageSummary, ApiError> {
        let store = self.store.clone();
        let spec = container_image::commit::CommitSpec {
            base: commit.base,
            reference: commit.reference,
            labels: commit.labels,
            created_by: commit.created_by,
        };
        blocking(move || {
            let reader = tokio_util::io::SyncIoBridge::new(tar);
            let record = store.commit(store_ns(ns), &spec, reader)?;
            Ok(summary(&record))
        })
        .await
    }

    /// Writes the archive to an unlinked temporary file and hands back a reader of it.
    async fn save(&self, ns: Namespace, references: Vec<String>) -> Result<Bytes, ApiError> {
        let store = self.store.clone();
        let file = blocking(move || {
            let work = store.work_dir();
            let mut file = tempfile::tempfile_in(&work).map_err(ImageError::io(&work))?;
            store.save(store_ns(ns), &references, &mut file)?;
            std::io::Seek::rewind(&mut file).map_err(ImageError::io(&work))?;
            Ok(file)
        })
        .await?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn remove(
        &self,
        ns: Namespace,
        reference: &str,
        in_use: InUse,
        force: bool,
    ) -> Result<RemoveReport, ApiError> {
        let (store, reference) = (self.store.clone(), reference.to_string());
        blocking(move || {
            let r = store.remove(store_ns(ns), &reference, &in_use, force)?;
            Ok(RemoveReport {
                untagged: r.untagged,
                deleted: r.deleted,
                freed_bytes: r.freed_bytes,
            })
        })
        .await
    }

    async fn usage(
        &self,
        ns: Namespace,
        untag: Vec<String>,
        in_use: InUse,
    ) -> Result<ImageUsage, ApiError> {
        let store = self.store.clone();
        blocking(move || {
            let u = store.usage(store_ns(ns), &untag, &in_use)?;
            Ok(ImageUsage {
                bytes: u.bytes,
                reclaimable: u.reclaimable,
            })
        })
        .await
    }

    async fn login(&self, uid: u32, login: LoginRequest) -> Result<(), ApiError> {
        self.store
            .credentials(uid)
            .login(
                &login.server,
                &login.username,
                &login.password,
                &self.registry.insecure,
            )
            .await
            .map_err(api_error)
    }

    async fn logout(&self, uid: u32, server: &str) -> Result<bool, ApiError> {
        let (creds, server) = (self.store.credentials(uid), server.to_string());
        blocking(move || creds.logout(&server)).await
    }

    async fn prepare(&self, ns: Namespace, reference: &str) -> Result<ImageInfo, ApiError> {
        let (store, reference, ns) = (self.store.clone(), reference.to_string(), store_ns(ns));
        blocking(move || {
            let (record, (disk, info), hold) = store.hold_base_disk(ns, &reference)?;
            Ok(ImageInfo {
                reference: record.reference,
                digest: record.digest,
                has_init: info.has_init,
                stop_signal: record.config.stop_signal,
                base_disk: disk,
                hold: ImageHold(Some(Box::new(hold))),
            })
        })
        .await
    }
}
