//! Talking to registries: the OCI distribution protocol through `oci-client` (which handles
//! the WWW-Authenticate challenge, bearer tokens and basic auth), plain HTTP only for loopback
//! registries or those configured as insecure, stored credentials, and the mirrors a registry
//! is reached through ([`Mirror`], [`endpoints`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};

use crate::error::ImageError;

/// Parses and normalises a reference (`alpine` → `docker.io/library/alpine:latest`).
pub fn parse_reference(text: &str) -> Result<Reference, ImageError> {
    text.parse::<Reference>()
        .map_err(|e| ImageError::InvalidReference {
            reference: text.to_string(),
            reason: e.to_string(),
        })
}

/// Whether a registry host is on this machine's loopback.
pub fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(registry)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A client for one registry: HTTP for loopback or insecure-listed registries, HTTPS else.
pub fn client(registry: &str, insecure: &[String]) -> Client {
    let plain = is_loopback(registry) || insecure.iter().any(|r| r == registry);
    client_with(registry, plain, false)
}

/// A client for one registry over plain HTTP (`plain`) or HTTPS, accepting certificates that
/// do not verify when `unverified`.
fn client_with(registry: &str, plain: bool, unverified: bool) -> Client {
    let protocol = if plain {
        oci_client::client::ClientProtocol::HttpsExcept(vec![registry.to_string()])
    } else {
        oci_client::client::ClientProtocol::Https
    };
    Client::new(oci_client::client::ClientConfig {
        protocol,
        accept_invalid_certificates: unverified,
        connect_timeout: Some(std::time::Duration::from_secs(15)),
        read_timeout: Some(std::time::Duration::from_secs(120)),
        ..Default::default()
    })
}

/// A place a registry's images may also be fetched from, tried before the registry itself
/// (the `[[registry.mirror]]` of containers' registries.conf, the `[host]` of containerd's
/// hosts.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port]`.
    pub host: String,
    /// Repositories live under this path on the mirror (`mirror.example/hub` → `hub`); empty
    /// when they keep the registry's own paths.
    pub prefix: String,
    /// Plain HTTP and certificates that do not verify are accepted.
    pub insecure: bool,
}

impl Mirror {
    /// Parses a location, `host[:port][/path]`, without a scheme: whether plain HTTP is
    /// allowed is `insecure`'s to say, so a location cannot silently downgrade.
    pub fn parse(location: &str, insecure: bool) -> Result<Mirror, String> {
        let text = location.trim();
        if text.contains("://") {
            return Err(format!(
                "mirror location `{location}`: give host[:port][/path] without a scheme \
                 (set `insecure = true` for a mirror served over plain HTTP)"
            ));
        }
        let (host, prefix) = text.split_once('/').unwrap_or((text, ""));
        let prefix = prefix.trim_matches('/');
        // A reference on the mirror must parse, which checks the host and the path at once.
        let probe = if prefix.is_empty() {
            format!("{host}/probe:latest")
        } else {
            format!("{host}/{prefix}/probe:latest")
        };
        let parsed = probe.parse::<Reference>().ok().filter(|r| {
            r.registry() == host && !host.is_empty() && host.to_ascii_lowercase() == host
        });
        if parsed.is_none() {
            return Err(format!(
                "mirror location `{location}` is not host[:port][/path] (lower case, e.g. \
                 `mirror.example:5000` or `mirror.example/dockerhub`)"
            ));
        }
        Ok(Mirror {
            host: host.to_string(),
            prefix: prefix.to_string(),
            insecure,
        })
    }

    /// The location as written in config (`host[:port][/path]`).
    pub fn location(&self) -> String {
        if self.prefix.is_empty() {
            self.host.clone()
        } else {
            format!("{}/{}", self.host, self.prefix)
        }
    }
}

/// One place to try for an image: a mirror or the registry itself.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The reference as it is fetched from here (the mirror's host and path).
    pub reference: Reference,
    /// Whether this is a mirror of the reference's registry.
    pub mirror: bool,
    /// Over plain HTTP.
    pub plain: bool,
    /// Certificates that do not verify are accepted.
    pub unverified: bool,
}

impl Endpoint {
    /// The host requests go to (`docker.io` is Docker Hub's API host).
    pub fn host(&self) -> &str {
        self.reference.resolve_registry()
    }

    /// A client for this endpoint.
    pub fn client(&self) -> Client {
        client_with(self.host(), self.plain, self.unverified)
    }

    /// The endpoint as messages name it: `127.0.0.1:5000 (mirror)`, `https://m.example`.
    pub fn describe(&self) -> String {
        let scheme = if self.plain { "http://" } else { "" };
        let what = if self.mirror { " (mirror)" } else { "" };
        format!("{scheme}{}{what}", self.reference.registry())
    }
}

/// Where to fetch `reference` from, in order: each mirror configured for its registry
/// (`mirrors`, keyed by registry as references name it: `docker.io`), then the registry. An
/// insecure mirror not on loopback is tried over HTTPS with any certificate, then over plain
/// HTTP, as Docker and Podman treat insecure registries.
pub fn endpoints(
    reference: &Reference,
    mirrors: &BTreeMap<String, Vec<Mirror>>,
    insecure: &[String],
) -> Vec<Endpoint> {
    let registry = normalise_server(reference.registry());
    let mut out = Vec::new();
    for m in mirrors.get(&registry).into_iter().flatten() {
        let repository = if m.prefix.is_empty() {
            reference.repository().to_string()
        } else {
            format!("{}/{}", m.prefix, reference.repository())
        };
        let at = retarget(reference, &m.host, repository);
        if is_loopback(&m.host) {
            out.push(Endpoint {
                reference: at,
                mirror: true,
                plain: true,
                unverified: false,
            });
        } else if m.insecure {
            for plain in [false, true] {
                out.push(Endpoint {
                    reference: at.clone(),
                    mirror: true,
                    plain,
                    unverified: !plain,
                });
            }
        } else {
            out.push(Endpoint {
                reference: at,
                mirror: true,
                plain: false,
                unverified: false,
            });
        }
    }
    let host = reference.resolve_registry();
    out.push(Endpoint {
        reference: reference.clone(),
        mirror: false,
        plain: is_loopback(host) || insecure.iter().any(|r| r == host),
        unverified: false,
    });
    out
}

/// `reference` at another registry and repository, with its tag and digest.
fn retarget(reference: &Reference, registry: &str, repository: String) -> Reference {
    let registry = registry.to_string();
    match (reference.tag(), reference.digest()) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.to_string(), d.to_string())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.to_string()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").to_string()),
    }
}

/// Maps a protocol error to ours, naming the registry.
pub fn registry_error(registry: &str, reference: &str, e: OciDistributionError) -> ImageError {
    match e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => ImageError::Unauthorized {
            registry: registry.to_string(),
        },
        OciDistributionError::ImageManifestNotFoundError(_) => ImageError::RemoteNotFound {
            registry: registry.to_string(),
            reference: reference.to_string(),
        },
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                        | oci_client::errors::OciErrorCode::NotFound
                )
            }) =>
        {
            ImageError::RemoteNotFound {
                registry: registry.to_string(),
                reference: reference.to_string(),
            }
        }
        OciDistributionError::ServerError { code: 401, .. } => ImageError::Unauthorized {
            registry: registry.to_string(),
        },
        OciDistributionError::ServerError { code: 404, .. } => ImageError::RemoteNotFound {
            registry: registry.to_string(),
            reference: reference.to_string(),
        },
        other => ImageError::Registry {
            registry: registry.to_string(),
            message: error_chain(&other),
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The registry name credentials are stored under: `https://host/v1/` → `host`, and Docker
/// Hub's several names → `docker.io` (the name references carry).
pub fn normalise_server(server: &str) -> String {
    let s = server.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// Stored registry credentials (`auth.json`, mode 0600, replaced atomically).
#[derive(Debug, Clone)]
pub struct Credentials {
    path: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CredentialFile {
    auths: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    username: String,
    password: String,
}

impl Credentials {
    /// The credentials of one host user: each user logs in for themselves.
    pub fn for_uid(root: &Path, uid: u32) -> Self {
        Self {
            path: root.join("auth").join(format!("{uid}.json")),
        }
    }

    fn load(&self) -> Result<CredentialFile, ImageError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ImageError::Malformed {
                what: "credentials file",
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CredentialFile::default()),
            Err(e) => Err(ImageError::io(&self.path)(e)),
        }
    }

    fn save(&self, file: &CredentialFile) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(file).expect("credentials serialise");
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(ImageError::io(dir))?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(ImageError::io(dir))?;
        }
        crate::fsutil::atomic_write(&self.path, &bytes, 0o600).map_err(ImageError::io(&self.path))
    }

    /// The auth to use for a registry.
    pub fn auth_for(&self, registry: &str) -> Result<RegistryAuth, ImageError> {
        Ok(match self.load()?.auths.get(&normalise_server(registry)) {
            Some(e) => RegistryAuth::Basic(e.username.clone(), e.password.clone()),
            None => RegistryAuth::Anonymous,
        })
    }

    /// Checks the credentials against the registry, then stores them.
    pub async fn login(
        &self,
        server: &str,
        username: &str,
        password: &str,
        insecure: &[String],
    ) -> Result<(), ImageError> {
        let server = &normalise_server(server);
        let client = client(server, insecure);
        // Any repository name will do for the challenge; the token is not kept.
        let probe = parse_reference(&format!("{server}/login-check:latest"))?;
        let auth = RegistryAuth::Basic(username.to_string(), password.to_string());
        match client
            .auth(&probe, &auth, oci_client::RegistryOperation::Pull)
            .await
        {
            Ok(_) => {}
            Err(e) => return Err(registry_error(server, server, e)),
        }
        // Basic-auth registries answer the challenge lazily: verify with a real request.
        match client
            .pull_manifest_raw(&probe, &auth, crate::manifest::ACCEPTED)
            .await
        {
            Ok(_) => {}
            Err(e) => match registry_error(server, server, e) {
                ImageError::RemoteNotFound { .. } => {}
                other => return Err(other),
            },
        }
        let mut file = self.load()?;
        file.auths.insert(
            server.to_string(),
            Entry {
                username: username.to_string(),
                password: password.to_string(),
            },
        );
        self.save(&file)
    }

    /// Forgets a registry's credentials; false when there were none.
    pub fn logout(&self, server: &str) -> Result<bool, ImageError> {
        let mut file = self.load()?;
        let had = file.auths.remove(&normalise_server(server)).is_some();
        if had {
            self.save(&file)?;
        }
        Ok(had)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(is_loopback("127.1.2.3"));
        assert!(!is_loopback("192.168.1.5:5000"));
        assert!(!is_loopback("registry.example:5000"));
    }

    #[test]
    fn server_names_are_normalised() {
        assert_eq!(normalise_server("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalise_server("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(
            normalise_server("http://Reg.Example:443/"),
            "reg.example:443"
        );
    }

    #[test]
    fn credentials_are_private_and_replaced_atomically() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let creds = Credentials::for_uid(dir.path(), 1000);
        let mut file = CredentialFile::default();
        file.auths.insert(
            "127.0.0.1:5000".into(),
            Entry {
                username: "u".into(),
                password: "p".into(),
            },
        );
        creds.save(&file).unwrap();
        let meta = std::fs::metadata(dir.path().join("auth/1000.json")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(matches!(
            creds.auth_for("127.0.0.1:5000").unwrap(),
            RegistryAuth::Basic(u, p) if u == "u" && p == "p"
        ));
        assert!(matches!(
            Credentials::for_uid(dir.path(), 0)
                .auth_for("127.0.0.1:5000")
                .unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(creds.logout("http://127.0.0.1:5000/").unwrap());
        assert!(!creds.logout("127.0.0.1:5000").unwrap());
    }

    fn hosts(e: &[Endpoint]) -> Vec<String> {
        e.iter()
            .map(|e| format!("{} {}", e.describe(), e.reference.whole()))
            .collect()
    }

    #[test]
    fn mirrors_come_first_in_order_then_the_registry() {
        let mut mirrors = BTreeMap::new();
        mirrors.insert(
            "docker.io".to_string(),
            vec![
                Mirror::parse("127.0.0.1:5000", false).unwrap(),
                Mirror::parse("mirror.example/hub", false).unwrap(),
                Mirror::parse("old.example:8080", true).unwrap(),
            ],
        );
        let alpine = parse_reference("alpine").unwrap();
        assert_eq!(
            hosts(&endpoints(&alpine, &mirrors, &[])),
            [
                "http://127.0.0.1:5000 (mirror) 127.0.0.1:5000/library/alpine:latest",
                "mirror.example (mirror) mirror.example/hub/library/alpine:latest",
                "old.example:8080 (mirror) old.example:8080/library/alpine:latest",
                "http://old.example:8080 (mirror) old.example:8080/library/alpine:latest",
                "docker.io docker.io/library/alpine:latest",
            ]
        );
        assert!(endpoints(&alpine, &mirrors, &[])[2].unverified);
        // A digest travels to the mirror; another registry's images have no mirror.
        let pinned = parse_reference(&format!("alpine@sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(
            endpoints(&pinned, &mirrors, &[])[0].reference.digest(),
            pinned.digest()
        );
        let other = parse_reference("quay.io/x/y:1").unwrap();
        assert_eq!(
            hosts(&endpoints(&other, &mirrors, &[])),
            ["quay.io quay.io/x/y:1"]
        );
    }

    #[test]
    fn bad_mirror_locations_are_refused_with_the_reason() {
        let e = Mirror::parse("http://127.0.0.1:5000", true).unwrap_err();
        assert!(e.contains("without a scheme"), "{e}");
        for bad in ["", "Mirror.Example", "a b", "host:port"] {
            let e = Mirror::parse(bad, false).unwrap_err();
            assert!(e.contains("host[:port][/path]"), "{bad}: {e}");
        }
        assert_eq!(
            Mirror::parse("m.example:5000/hub/", false)
                .unwrap()
                .location(),
            "m.example:5000/hub"
        );
    }

    #[test]
    fn references_are_normalised() {
        assert_eq!(
            parse_reference("alpine").unwrap().whole(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            parse_reference("127.0.0.1:5000/x/y:1").unwrap().whole(),
            "127.0.0.1:5000/x/y:1"
        );
        assert!(parse_reference("UPPER/Case::bad").is_err());
    }
}
