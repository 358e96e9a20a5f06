//! Registry mirrors from config.toml: Apple's quickstart line, `container machine create
//! alpine:latest --name dev`, verbatim, served by a local registry configured as a mirror of
//! Docker Hub (a busybox image pushed there as `library/alpine:latest`); a mirror that is
//! down is skipped for the next; `image inspect` says which one served the image; a bad
//! mirror stops the service at start with the reason. Docker Hub itself is never reached:
//! the working mirror answers first, and everything runs in the test's network namespace.

use container_e2e::{Registry, Service, install_bin, is_root, kernel_config, require, test_image};

#[test]
fn the_quickstart_pulls_docker_hub_images_through_a_mirror() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    registry.push(&test_image("busybox"), "library/alpine:latest");
    // Port 9 (discard) listens nowhere in the test's namespace: a mirror that is down.
    let config = format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\nhome-mount = \"none\"\n\
         [registry.mirrors]\n\"docker.io\" = [\n  {{ location = \"127.0.0.1:9\" }},\n  \
         {{ location = \"{}\" }},\n]\n{}",
        registry.addr,
        kernel_config()
    );
    let service = Service::start(&config);

    let created = service.cli(&["machine", "create", "alpine:latest", "--name", "dev"]);
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(created.status.success(), "{stderr}\n{}", service.log());
    assert_eq!(String::from_utf8_lossy(&created.stdout).trim(), "dev");
    assert!(
        stderr.contains("127.0.0.1:9 (mirror) failed"),
        "the mirror that is down is reported and skipped: {stderr}"
    );
    service.cli_ok(&["machine", "run", "-n", "dev", "true"]);

    let out = service.cli_ok(&["image", "inspect", "alpine:latest"]);
    let detail: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        detail[0]["references"][0], "docker.io/library/alpine:latest",
        "{detail}"
    );
    assert_eq!(
        detail[0]["source"],
        serde_json::json!({
            "reference": format!("{}/library/alpine:latest", registry.addr),
            "mirror": true,
        }),
        "inspect says which mirror served the image"
    );
    let props = service.cli_ok(&["system", "property", "ls"]);
    assert!(props.contains("registry.mirrors.\"docker.io\""), "{props}");
    service.cli_ok(&["machine", "rm", "-f", "dev"]);
}

#[test]
fn a_bad_mirror_stops_the_service_at_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[registry.mirrors]\n\"docker.io\" = [{ location = \"https://mirror.example\" }]\n",
    )
    .unwrap();
    // The configuration is read before anything else: the service exits without touching
    // the root, the network or the socket.
    let out = std::process::Command::new(install_bin("container-apiserver"))
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("--socket")
        .arg(dir.path().join("api.sock"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&config.display().to_string())
            && stderr.contains("registry.mirrors.\"docker.io\"")
            && stderr.contains("without a scheme"),
        "{stderr}"
    );
    assert!(!dir.path().join("root").exists());
}
