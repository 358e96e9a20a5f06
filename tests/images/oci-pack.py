#!/usr/bin/env python3
"""OCI image layout tooling for the test image recipes (tests/images/build.sh drives it).

  oci-pack.py pack OUT_LAYOUT [--base LAYOUT] [--config CONFIG_JSON] [--name NAME]
              LAYER_DIR[:gzip|:zstd|:none] ...
      Writes an OCI image layout tagged `latest`: the base image's layers (blobs shared,
      not re-packed) then one layer per LAYER_DIR, archived with GNU tar (numeric owners,
      xattrs, sorted names, mtimes clamped) so that the same tree gives the same digest.
      CONFIG_JSON holds the image config's `config` object (Cmd, Env, StopSignal...); its keys
      replace the base's.
  oci-pack.py unpack LAYOUT DEST
      Applies every layer of LAYOUT's `latest` image to DEST in order, whiteouts included.
  oci-pack.py overlay-to-oci UPPER LOWER
      Turns an overlayfs upper directory into an OCI layer tree: whiteout devices become
      `.wh.NAME` files, opaque directories that hide a LOWER directory get `.wh..wh..opq`,
      overlay xattrs are dropped.
"""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

CREATED = "2024-01-01T00:00:00Z"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def blob_path(layout, digest):
    algo, _, hexdigest = digest.partition(":")
    return os.path.join(layout, "blobs", algo, hexdigest)


def add_blob(layout, path):
    digest = "sha256:" + sha256_file(path)
    os.replace(path, blob_path(layout, digest))
    return digest, os.path.getsize(blob_path(layout, digest))


def write_blob(layout, data):
    fd, tmp = tempfile.mkstemp(dir=layout)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return add_blob(layout, tmp)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def latest(layout):
    """The manifest and config of LAYOUT's image tagged `latest`."""
    index = read_json(os.path.join(layout, "index.json"))
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == "latest":
            manifest = read_json(blob_path(layout, desc["digest"]))
            config = read_json(blob_path(layout, manifest["config"]["digest"]))
            return manifest, config
    sys.exit(f"oci-pack: {layout} has no image tagged latest")


def pack(argv):
    out, base, config_path, name, layers = argv[0], None, None, "image", []
    args = iter(argv[1:])
    for arg in args:
        if arg == "--base":
            base = next(args)
        elif arg == "--config":
            config_path = next(args)
        elif arg == "--name":
            name = next(args)
        else:
            layers.append(arg)
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)

    image_config, diff_ids, descriptors, history = {}, [], [], []
    if base:
        base_manifest, base_cfg = latest(base)
        image_config = base_cfg.get("config", {})
        diff_ids = list(base_cfg["rootfs"]["diff_ids"])
        history = list(base_cfg.get("history", []))
        for desc in base_manifest["layers"]:
            src, dst = blob_path(base, desc["digest"]), blob_path(out, desc["digest"])
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            descriptors.append(desc)
    if config_path:
        image_config = {**image_config, **read_json(config_path)}

    for spec in layers:
        tree, _, comp = spec.partition(":")
        comp = comp or "gzip"
        if comp not in MEDIA:
            sys.exit(f"oci-pack: unknown compression {comp!r} for {tree}")
        fd, tar_path = tempfile.mkstemp(dir=out)
        os.close(fd)
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name",
             "--mtime=2024-01-01 00:00:00", "--clamp-mtime", "-C", tree, "-cf", tar_path, "."],
            check=True)
        diff_ids.append("sha256:" + sha256_file(tar_path))
        blob = tar_path
        if comp == "gzip":
            subprocess.run(["gzip", "-n", "-6", tar_path], check=True)
            blob = tar_path + ".gz"
        elif comp == "zstd":
            subprocess.run(["zstd", "-q", "--rm", "-3", tar_path], check=True)
            blob = tar_path + ".zst"
        digest, size = add_blob(out, blob)
        descriptors.append({"mediaType": MEDIA[comp], "digest": digest, "size": size})
        history.append({"created": CREATED, "created_by": f"tests/images/recipes/{name}.sh"})

    config = {
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
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


def tar_decompress_flag(media_type):
    if media_type.endswith("+gzip") or media_type.endswith(".tar.gzip") \
            or media_type.endswith("diff.tar.gzip"):
        return ["--gzip"]
    if media_type.endswith("+zstd"):
        return ["--zstd"]
    return []


def inside(dest, member):
    """DEST/member, refusing names that climb out (these are our own images, but still)."""
    parts = [p for p in member.split("/") if p not in ("", ".")]
    if ".." in parts:
        sys.exit(f"oci-pack: layer entry {member!r} leaves the root")
    return os.path.join(dest, *parts) if parts else dest


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def unpack(argv):
    layout, dest = argv
    os.makedirs(dest, exist_ok=True)
    manifest, _ = latest(layout)
    for desc in manifest["layers"]:
        blob = blob_path(layout, desc["digest"])
        flag = tar_decompress_flag(desc["mediaType"])
        names = subprocess.run(["tar", *flag, "-tf", blob], check=True, capture_output=True,
                               text=True).stdout.splitlines()
        # Whiteouts hide what lower layers hold, so they are applied before this layer lands.
        for name in names:
            base = os.path.basename(name.rstrip("/"))
            parent = inside(dest, os.path.dirname(name.rstrip("/")))
            if base == OPAQUE:
                if os.path.isdir(parent):
                    for child in os.listdir(parent):
                        remove(os.path.join(parent, child))
            elif base.startswith(WHITEOUT):
                remove(os.path.join(parent, base[len(WHITEOUT):]))
        subprocess.run(["tar", *flag, "--numeric-owner", "--xattrs", "--xattrs-include=*",
                        "--same-permissions", "--same-owner", "--exclude=.wh.*",
                        "-xf", blob, "-C", dest], check=True)


def overlay_to_oci(argv):
    upper, lower = argv
    for root, dirs, files in os.walk(upper):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                os.unlink(path)
                with open(os.path.join(root, WHITEOUT + name), "w"):
                    pass
                continue
            follow = not stat.S_ISLNK(st.st_mode)
            for attr in os.listxattr(path, follow_symlinks=follow):
                if not attr.startswith("trusted.overlay."):
                    continue
                # overlayfs marks some new directories opaque too; only those that hide a
                # lower directory need saying so.
                hides = os.path.isdir(os.path.join(lower, os.path.relpath(path, upper)))
                if attr == "trusted.overlay.opaque" and hides and \
                        os.getxattr(path, attr, follow_symlinks=follow) == b"y":
                    with open(os.path.join(path, OPAQUE), "w"):
                        pass
                os.removexattr(path, attr, follow_symlinks=follow)
    for attr in os.listxattr(upper):
        if attr.startswith("trusted.overlay."):
            os.removexattr(upper, attr)


def main():
    commands = {"pack": pack, "unpack": unpack, "overlay-to-oci": overlay_to_oci}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
