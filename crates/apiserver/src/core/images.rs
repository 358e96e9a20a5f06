//! Image requests: pull (streaming progress), list, inspect, tag, load, save, remove, registry
//! login and logout, through the [`Images`](super::ports::Images) port. The core adds what
//! only it knows: who is asking, and so which namespace of names they act in (their own; the
//! system-wide one for root with `system`), and which images machines use.

use container_api::image::{ImageDetail, ImageSummary, LoginRequest, PullEvent, RemoveReport};
use container_api::{ApiError, ErrorKind};
use tokio::sync::mpsc;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use container_api::size::format_size;
use tokio::io::{AsyncRead, ReadBuf};

use super::ports::{Bytes, InUse, Namespace};
use super::{Caller, Core, over_limit};

/// An upload that fails once it has given more than `left` bytes (and says so in `over`), so
/// nobody spools more than their limit whatever they send.
struct Capped {
    inner: Bytes,
    left: u64,
    over: Arc<AtomicBool>,
    /// What is still read and dropped once over the limit (see `drain`).
    drain_left: u64,
}

/// How much of an upload over the limit is still read (and dropped) before the refusal:
/// a client that meets a closed connection while writing may report the broken pipe and
/// not the refusal (ours reads the answer anyway: `container_api::client`'s `HeardOut`;
/// curl does not), so the rest of a modest overshoot is read first. Past this, the
/// connection closes.
const DRAIN: u64 = 64 << 20;

impl Capped {
    /// Reads and drops what the client still sends, up to `drain_left`; ready once that is
    /// done (at the end of the upload, an error of it, or the bound).
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut scratch = [0u8; 64 * 1024];
        while self.drain_left > 0 {
            let mut b = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut b) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !b.filled().is_empty() => {
                    self.drain_left = self.drain_left.saturating_sub(b.filled().len() as u64);
                }
                Poll::Ready(_) => break,
            }
        }
        Poll::Ready(())
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.over.load(Ordering::SeqCst) {
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
            let read = (buf.filled().len() - before) as u64;
            match self.left.checked_sub(read) {
                Some(left) => {
                    self.left = left;
                    return Poll::Ready(Ok(()));
                }
                None => {
                    // Nothing of the read that went over is passed on.
                    buf.set_filled(before);
                    self.over.store(true, Ordering::SeqCst);
                }
            }
        }
        std::task::ready!(self.drain(cx));
        Poll::Ready(Err(std::io::Error::other("over the upload limit")))
    }
}

/// The names of `ns` itself, among the `images` it sees, whose image none of the machines the
/// caller sees (named in `in_use`) was created from: what `image prune --all` removes.
pub(super) fn prunable<'a>(
    ns: Namespace,
    images: &'a [ImageSummary],
    in_use: &'a InUse,
) -> impl Iterator<Item = &'a ImageSummary> {
    images.iter().filter(move |i| {
        let own = match ns {
            Namespace::System => i.is_system(),
            Namespace::User(uid) => i.owner == Some(uid),
        };
        own && !used_by_visible(in_use, &i.digest)
    })
}

/// Whether one of the machines the caller sees (those `in_use` names) was created from the
/// image `digest`.
pub(super) fn used_by_visible(in_use: &InUse, digest: &str) -> bool {
    in_use.get(digest).is_some_and(|m| !m.is_empty())
}

/// The namespace `caller` acts in: their own, or (root only) the system-wide one.
fn namespace(caller: &Caller, system: bool) -> Result<Namespace, ApiError> {
    match system {
        false => Ok(Namespace::User(caller.uid)),
        true if caller.is_root() => Ok(Namespace::System),
        true => Err(ApiError::new(
            ErrorKind::PermissionDenied,
            "only root can publish or change system-wide images (--system)",
        )),
    }
}

impl Core {
    pub(super) async fn image_list(
        &self,
        caller: &Caller,
        all: bool,
    ) -> Result<Vec<ImageSummary>, ApiError> {
        if !all {
            return self.state.images.list(namespace(caller, false)?).await;
        }
        if !caller.is_root() {
            return Err(ApiError::new(
                ErrorKind::PermissionDenied,
                "only root can list every user's images (--all)",
            ));
        }
        self.state.images.list_all().await
    }

    pub(super) async fn image_inspect(
        &self,
        caller: &Caller,
        reference: String,
    ) -> Result<ImageDetail, ApiError> {
        self.state
            .images
            .inspect(namespace(caller, false)?, &reference)
            .await
    }

    pub(super) async fn image_tag(
        &self,
        caller: &Caller,
        source: String,
        target: String,
        system: bool,
    ) -> Result<ImageSummary, ApiError> {
        let ns = namespace(caller, system)?;
        self.state.images.tag(ns, &source, &target).await
    }

    pub(super) async fn image_load(
        &self,
        caller: &Caller,
        archive: Bytes,
        system: bool,
    ) -> Result<Vec<ImageSummary>, ApiError> {
        let ns = namespace(caller, system)?;
        if caller.is_root() {
            return self.state.images.load(ns, archive).await;
        }
        let max = self.state.config.limits.image_load_size;
        let over = Arc::new(AtomicBool::new(false));
        let capped = Capped {
            inner: archive,
            left: max,
            over: over.clone(),
            drain_left: DRAIN,
        };
        match self.state.images.load(ns, Box::new(capped)).await {
            // Whatever the store made of the cut stream, the cause is the limit.
            Err(_) if over.load(Ordering::SeqCst) => Err(over_limit(
                format!("the archive is larger than {}", format_size(max)),
                "image-load-size",
            )),
            loaded => loaded,
        }
    }

    pub(super) async fn image_save(
        &self,
        caller: &Caller,
        references: Vec<String>,
    ) -> Result<Bytes, ApiError> {
        if references.is_empty() {
            return Err(ApiError::invalid("name at least one image to save"));
        }
        self.state
            .images
            .save(namespace(caller, false)?, references)
            .await
    }

    /// Manifest digests in use by every machine, with the names of those `caller` may see.
    pub(super) fn images_in_use(&self, caller: &Caller) -> Result<InUse, ApiError> {
        let mut used = InUse::new();
        for m in self.state.machines.list()? {
            let names = used.entry(m.image_digest).or_default();
            if caller.is_root() || m.owner_uid == caller.uid {
                names.push(m.name);
            }
        }
        Ok(used)
    }

    pub(super) async fn image_remove(
        &self,
        caller: &Caller,
        reference: String,
        force: bool,
        system: bool,
    ) -> Result<RemoveReport, ApiError> {
        let ns = namespace(caller, system)?;
        let in_use = self.images_in_use(caller)?;
        self.state
            .images
            .remove(ns, &reference, in_use, force)
            .await
    }

    /// `image prune`: with `all`, removes each of the caller's own names (in `system`, the
    /// system-wide ones) whose image none of the machines the caller sees was created from,
    /// as `image rm` would, and reports what went. Without `all` there is nothing to do: the
    /// store keeps no image without a name (removing the last name deletes what nothing else
    /// reaches), so no image dangles.
    pub(super) async fn image_prune(
        &self,
        caller: &Caller,
        all: bool,
        system: bool,
    ) -> Result<RemoveReport, ApiError> {
        let ns = namespace(caller, system)?;
        let mut report = RemoveReport::default();
        if !all {
            return Ok(report);
        }
        let in_use = self.images_in_use(caller)?;
        let images = self.state.images.list(ns).await?;
        for image in prunable(ns, &images, &in_use) {
            let r = self
                .state
                .images
                .remove(ns, &image.reference, in_use.clone(), false)
                .await?;
            report.untagged.extend(r.untagged);
            report.deleted.extend(r.deleted);
            report.freed_bytes += r.freed_bytes;
        }
        Ok(report)
    }

    /// Pulls, reporting progress on `events`, ending with `Done` or `Error`.
    pub(super) async fn image_pull(
        &self,
        caller: &Caller,
        reference: String,
        system: bool,
        events: mpsc::Sender<PullEvent>,
    ) {
        let result = match namespace(caller, system) {
            Ok(ns) => {
                self.state
                    .images
                    .pull(caller.uid, ns, &reference, events.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        let last = match result {
            Ok(image) => PullEvent::Done { image },
            Err(error) => PullEvent::Error { error },
        };
        let _ = events.send(last).await;
    }
    /// Pushes an image the caller sees (their own, or a system-wide one) with their registry
    /// credentials, reporting progress on `events`, ending with `Done` or `Error`.
    pub(super) async fn image_push(
        &self,
        caller: &Caller,
        reference: String,
        events: mpsc::Sender<PullEvent>,
    ) {
        let result = self
            .state
            .images
            .push(
                caller.uid,
                Namespace::User(caller.uid),
                &reference,
                events.clone(),
            )
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
