//! Pulling an image: resolve the reference to a linux/amd64 manifest (through an index if the
//! registry serves one) at the first of its endpoints that has it (each mirror configured for
//! its registry, in order, then the registry: [`registry::endpoints`]), fetch the config and
//! layers from there concurrently into the content store (each verified against its digest
//! and size while it is written; blobs already present are not fetched), build the base
//! disk, and only then record the reference with where it came from.
//!
//! Everything the pull has fetched is held by a lease until the reference is recorded, so a
//! concurrent `remove` cannot collect it; a pull that fails or is cancelled leaves verified
//! blobs (reused by the next pull, collected by the next `remove`) and nothing else.

use futures::{StreamExt, TryStreamExt};
use oci_client::manifest::OciDescriptor;

use crate::content::digest_of;
use crate::error::ImageError;
use crate::manifest::{self, Parsed};
use crate::registry;
use crate::store::{
    ImageRecord, ImageSource, ImageStore, Namespace, Progress, PullOptions, PullProgress,
};

/// Bytes between two progress reports of one blob.
const PROGRESS_STEP: u64 = 256 << 10;

/// One blob to fetch.
struct Blob {
    what: &'static str,
    descriptor: OciDescriptor,
}

/// A registry session for one repository.
struct Session<'a> {
    client: oci_client::Client,
    repo: oci_client::Reference,
    /// The registry as users name it (`docker.io`, `127.0.0.1:5000`), for messages.
    registry: String,
    /// The reference being pulled, normalised, for messages.
    name: String,
    progress: &'a dyn PullProgress,
}

impl ImageStore {
    /// Pulls an image, builds its base disk and records its reference in `namespace`.
    /// Returns its record.
    pub async fn pull(
        &self,
        namespace: Namespace,
        reference: &str,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<ImageRecord, ImageError> {
        let r = registry::parse_reference(reference)?;
        let name = r.whole();
        let credentials = self.credentials(opts.uid);
        let endpoints = registry::endpoints(&r, &opts.mirrors, &opts.insecure);
        let last = endpoints.len() - 1;
        let mut failures = Vec::new();
        let mut found = None;
        // The manifest decides where the image comes from: the first endpoint that has it.
        // Its blobs come from the same place, which served the manifest naming them.
        for (i, endpoint) in endpoints.into_iter().enumerate() {
            let at = endpoint.reference.registry().to_string();
            let auth = credentials.auth_for(&at)?;
            let mut session = Session {
                client: endpoint.client(),
                repo: endpoint.reference.clone(),
                registry: at,
                name: name.clone(),
                progress,
            };
            match session.resolve(&auth).await {
                Ok(resolved) => {
                    found = Some((endpoint, session, resolved));
                    break;
                }
                Err(e) if i < last => {
                    progress.report(Progress::Step(format!(
                        "{} failed: {e}; trying the next",
                        endpoint.describe()
                    )));
                    failures.push(format!("{}: {e}", endpoint.describe()));
                }
                Err(e) if failures.is_empty() => return Err(e),
                Err(e) => {
                    return Err(ImageError::AllSourcesFailed {
                        reference: name,
                        mirrors: failures.join("; "),
                        source: Box::new(e),
                    });
                }
            }
        }
        let Some((endpoint, session, (digest, bytes, m))) = found else {
            unreachable!("the registry itself is always the last endpoint")
        };
        if endpoint.mirror {
            progress.report(Progress::Step(format!(
                "from {}",
                endpoint.reference.whole()
            )));
        }
        let source = ImageSource {
            reference: endpoint.reference.whole(),
            mirror: endpoint.mirror,
        };
        let mut lease = self.lease();
        lease.add(&digest);
        lease.add(&m.config.digest);
        for l in &m.layers {
            lease.add(&l.digest);
        }
        progress.report(Progress::Resolved {
            digest: digest.clone(),
            layers: m.layers.len(),
        });
        // Refused before a byte of it is fetched; and the fetch stops at the declared size
        // (see `BlobWriter::write`), so a registry cannot send more than this either.
        manifest::check_json_size(m.config.size.max(0) as u64, || {
            format!("config {} of {name}", m.config.digest)
        })?;
        let mut blobs = vec![Blob {
            what: "config",
            descriptor: m.config.clone(),
        }];
        blobs.extend(m.layers.iter().map(|l| Blob {
            what: "layer",
            descriptor: l.clone(),
        }));
        let session = &session;
        futures::stream::iter(blobs.into_iter().map(|b| session.fetch(self, b)))
            .buffer_unordered(opts.max_concurrent_downloads.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        let config = manifest::parse_config(&self.content.read(&m.config.digest)?)?;
        if config.os != "linux" || config.architecture != "amd64" {
            return Err(ImageError::NoPlatform(format!(
                "{name} (it is {}/{})",
                config.os, config.architecture
            )));
        }
        self.content.put("manifest", &digest, &bytes)?;
        progress.report(Progress::Step("building the base disk".into()));
        let job = self.disk_job(&digest, &name)?;
        tokio::task::spawn_blocking(move || job.run())
            .await
            .map_err(|e| ImageError::Mkfs(format!("the disk build task failed: {e}")))??;
        self.set_ref(namespace, &name, &digest, Some(source))?;
        drop(lease);
        self.inspect(namespace, &name)
    }
}

impl Session<'_> {
    fn error(&self, e: oci_client::errors::OciDistributionError) -> ImageError {
        registry::registry_error(&self.registry, &self.name, e)
    }

    /// A failed blob stream. oci-client verifies digests too, failing the stream's end on a
    /// mismatch: that is reported as ours would be (a short blob as a size mismatch).
    fn stream_error(&self, blob: &Blob, e: std::io::Error, written: u64) -> ImageError {
        use oci_client::errors::DigestError;
        let digest = &blob.descriptor.digest;
        let size = blob.descriptor.size.max(0) as u64;
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<DigestError>())
        {
            Some(DigestError::VerificationError { .. }) if written != size => {
                ImageError::SizeMismatch {
                    what: blob.what,
                    digest: digest.clone(),
                    expected: size,
                    actual: written,
                }
            }
            Some(DigestError::VerificationError { expected, actual }) => {
                ImageError::DigestMismatch {
                    what: blob.what,
                    digest: expected.clone(),
                    actual: actual.clone(),
                }
            }
            _ => self.error(e.into()),
        }
    }

    /// Fetches a manifest by `reference` (tag or digest), checked against its digest and,
    /// when an index gave it, the size it `declared`.
    async fn manifest(
        &self,
        reference: &oci_client::Reference,
        declared: Option<i64>,
        auth: &oci_client::secrets::RegistryAuth,
    ) -> Result<(String, Vec<u8>, Parsed), ImageError> {
        let what = || {
            let at = reference.digest().or(reference.tag()).unwrap_or("latest");
            format!("manifest {at} of {}", self.name)
        };
        if let Some(size) = declared {
            manifest::check_json_size(size.max(0) as u64, what)?;
        }
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(reference, auth, manifest::ACCEPTED)
            .await
            .map_err(|e| self.error(e))?;
        // oci-client reads the whole body into memory before returning it and offers no limit
        // (oras-project/rust-oci-client#206), so a manifest fetched by tag can only be refused
        // here, once read; one an index names is refused above, before the request.
        manifest::check_json_size(bytes.len() as u64, what)?;
        if declared.is_some_and(|size| size != bytes.len() as i64) {
            return Err(ImageError::SizeMismatch {
                what: "manifest",
                digest: reference.digest().unwrap_or_default().to_string(),
                expected: declared.unwrap_or_default().max(0) as u64,
                actual: bytes.len() as u64,
            });
        }
        // oci-client checks the body against the digest it was asked for, or the registry's
        // Docker-Content-Digest header; check again so the rule holds whatever it does.
        let parsed = manifest::parse(&bytes)?;
        let actual = digest_of(&bytes);
        let expected = reference.digest().map_or(digest.as_str(), |d| d);
        if actual != expected {
            return Err(ImageError::DigestMismatch {
                what: "manifest",
                digest: expected.to_string(),
                actual,
            });
        }
        Ok((actual, bytes.to_vec(), parsed))
    }

    /// The linux/amd64 manifest the reference names: its digest, bytes and parsed form.
    async fn resolve(
        &mut self,
        auth: &oci_client::secrets::RegistryAuth,
    ) -> Result<(String, Vec<u8>, oci_client::manifest::OciImageManifest), ImageError> {
        let (digest, bytes, parsed) = self.manifest(&self.repo, None, auth).await?;
        let (digest, bytes, parsed) = match parsed {
            Parsed::Manifest(_) => (digest, bytes, parsed),
            Parsed::Index(index) => {
                let picked = manifest::pick_platform(&index)
                    .ok_or_else(|| ImageError::NoPlatform(self.name.clone()))?;
                let declared = index
                    .manifests
                    .iter()
                    .find(|m| m.digest == picked)
                    .map(|m| m.size);
                self.repo = oci_client::Reference::with_digest(
                    self.repo.registry().to_string(),
                    self.repo.repository().to_string(),
                    picked,
                );
                let repo = self.repo.clone();
                self.manifest(&repo, declared, auth).await?
            }
        };
        match parsed {
            Parsed::Manifest(m) => Ok((digest, bytes, *m)),
            Parsed::Index(_) => Err(ImageError::Malformed {
                what: "image index",
                message: format!("{digest} is an index inside an index"),
            }),
        }
    }

    /// Fetches one blob into the content store, verified; a present blob is not fetched.
    async fn fetch(&self, store: &ImageStore, blob: Blob) -> Result<(), ImageError> {
        let digest = blob.descriptor.digest.clone();
        let size = blob.descriptor.size.max(0) as u64;
        if store.content.contains(&digest) {
            self.progress.report(Progress::BlobDone {
                digest,
                cached: true,
            });
            return Ok(());
        }
        let mut writer = store.content.writer(blob.what, &digest, Some(size))?;
        let response = self
            .client
            .pull_blob_stream(&self.repo, &blob.descriptor)
            .await
            .map_err(|e| self.error(e))?;
        let mut stream = response.stream;
        let mut reported = 0;
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| self.stream_error(&blob, e, writer.written()))?
        {
            writer.write(&chunk)?;
            if writer.written() - reported >= PROGRESS_STEP {
                reported = writer.written();
                self.progress.report(Progress::Bytes {
                    digest: digest.clone(),
                    current: reported,
                    total: size,
                });
            }
        }
        writer.commit()?;
        self.progress.report(Progress::Bytes {
            digest: digest.clone(),
            current: size,
            total: size,
        });
        self.progress.report(Progress::BlobDone {
            digest,
            cached: false,
        });
        Ok(())
    }
}
