//! Pushing an image: a name the caller sees goes to the registry its reference names (never
//! a mirror: mirrors are for reading), over plain HTTP on the same terms as a pull (loopback
//! registries and those listed as insecure), with the caller's stored credentials. Each blob
//! the registry lacks is streamed from the content store in chunks; blobs it has are not
//! sent again. The manifest goes last, as stored, byte for byte, so the image keeps its
//! digest on the registry.

use futures::StreamExt;
use oci_client::RegistryOperation;
use oci_client::manifest::OciDescriptor;

use crate::error::ImageError;
use crate::registry;
use crate::store::{ImageRecord, ImageStore, Namespace, Progress, PullOptions, PullProgress};

/// Bytes read from a blob per upload chunk (one PATCH request each).
const CHUNK: usize = 4 << 20;

impl ImageStore {
    /// Pushes the image `namespace` sees as `wanted` to its registry, under its reference.
    /// Only `opts.insecure` and `opts.uid` (whose credentials) matter. Returns its record.
    pub async fn push(
        &self,
        namespace: Namespace,
        wanted: &str,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<ImageRecord, ImageError> {
        let record = self.inspect(namespace, wanted)?;
        let r = registry::parse_reference(&record.reference)?;
        let name = r.whole();
        let endpoint = registry::endpoints(&r, &Default::default(), &opts.insecure)
            .pop()
            .expect("the registry itself is always an endpoint");
        let at = r.registry().to_string();
        let auth = self.credentials(opts.uid).auth_for(&at)?;
        let client = endpoint.client();
        let error = |e| registry::registry_error(&at, &name, e);
        // Holds what the push reads against a concurrent `remove` of the name.
        let mut lease = self.lease();
        lease.add(&record.digest);
        let m = self.manifest_of(&record.digest)?;
        let mut blobs: Vec<OciDescriptor> = m.layers.clone();
        blobs.push(m.config.clone());
        for b in &blobs {
            lease.add(&b.digest);
        }
        client
            .auth(&r, &auth, RegistryOperation::Push)
            .await
            .map_err(error)?;
        progress.report(Progress::Resolved {
            digest: record.digest.clone(),
            layers: m.layers.len(),
        });
        for blob in &blobs {
            let digest = blob.digest.clone();
            if client.blob_exists(&r, &digest).await.map_err(error)? {
                progress.report(Progress::BlobDone {
                    digest,
                    cached: true,
                });
                continue;
            }
            let path = self.content.path(&digest)?;
            let total = self.content.size(&digest)?;
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(ImageError::io(&path))?;
            let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
            let chunks = futures::stream::unfold(file, |mut file| async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; CHUNK];
                let mut filled = 0;
                while filled < CHUNK {
                    match file.read(&mut buf[filled..]).await {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => return Some((Err(e.into()), file)),
                    }
                }
                if filled == 0 {
                    return None;
                }
                buf.truncate(filled);
                Some((Ok(bytes::Bytes::from(buf)), file))
            })
            .map(
                move |chunk: Result<bytes::Bytes, oci_client::errors::OciDistributionError>| {
                    if let Ok(b) = &chunk {
                        let _ = sent_tx.send(b.len() as u64);
                    }
                    chunk
                },
            );
            let upload = client.push_blob_stream(&r, chunks, &blob.digest, Some(total));
            tokio::pin!(upload);
            let mut current = 0;
            let result = loop {
                tokio::select! {
                    done = &mut upload => break done,
                    Some(n) = sent_rx.recv() => {
                        current += n;
                        progress.report(Progress::Bytes {
                            digest: digest.clone(),
                            current,
                            total,
                        });
                    }
                }
            };
            result.map_err(error)?;
            progress.report(Progress::Bytes {
                digest: digest.clone(),
                current: total,
                total,
            });
            progress.report(Progress::BlobDone {
                digest,
                cached: false,
            });
        }
        let bytes = self.content.read(&record.digest)?;
        let media_type = record
            .media_type
            .parse()
            .map_err(|_| ImageError::UnsupportedMediaType(record.media_type.clone()))?;
        progress.report(Progress::Step(format!("writing the manifest to {name}")));
        client
            .push_manifest_raw(&r, bytes, media_type)
            .await
            .map_err(error)?;
        drop(lease);
        Ok(record)
    }
}
