#!/usr/bin/env python3
"""Packs root filesystem trees into an OCI image layout, one layer per tree.

usage: oci-pack.py OUT_LAYOUT CONFIG_JSON LAYER_DIR[:gzip|:zstd|:none] ...

Each LAYER_DIR is archived with GNU tar (numeric owners, xattrs, sorted names, fixed mtime
clamp) and compressed as asked; whiteouts are whatever the tree holds (`.wh.NAME` files).
CONFIG_JSON gives the image config's `config` object (Cmd, Env, StopSignal...).
The image is tagged `latest`.
"""
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def add_blob(layout, path):
    digest = sha256_file(path)
    dest = os.path.join(layout, "blobs", "sha256", digest)
    shutil.move(path, dest)
    return "sha256:" + digest, os.path.getsize(dest)

def write_blob(layout, data):
    fd, tmp = tempfile.mkstemp(dir=layout)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return add_blob(layout, tmp)

def main():
    out, config_path, layers = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(config_path) as f:
        image_config = json.load(f)
    diff_ids, descriptors = [], []
    for spec in layers:
        tree, _, comp = spec.partition(":")
        comp = comp or "gzip"
        fd, tar_path = tempfile.mkstemp(dir=out)
        os.close(fd)
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name",
             "--mtime=2024-01-01 00:00:00", "--clamp-mtime", "-C", tree, "-cf", tar_path, "."],
            check=True)
        diff_ids.append("sha256:" + sha256_file(tar_path))
        if comp == "gzip":
            subprocess.run(["gzip", "-n", "-6", tar_path], check=True)
            blob, media = tar_path + ".gz", "application/vnd.oci.image.layer.v1.tar+gzip"
        elif comp == "zstd":
            subprocess.run(["zstd", "-q", "--rm", "-3", tar_path], check=True)
            blob, media = tar_path + ".zst", "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            blob, media = tar_path, "application/vnd.oci.image.layer.v1.tar"
        digest, size = add_blob(out, blob)
        descriptors.append({"mediaType": media, "digest": digest, "size": size})
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "tests/images"}
                    for _ in layers],
    }
    cdigest, csize = write_blob(out, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cdigest, "size": csize},
        "layers": descriptors,
    }
    mdigest, msize = write_blob(out, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest, "size": msize,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    }
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f)

if __name__ == "__main__":
    main()
