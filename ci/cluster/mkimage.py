#!/usr/bin/env python3
"""Writes a one-layer docker-archive (what `docker save` writes and
`ctr images import` / `docker load` read) from a root filesystem directory,
without a container engine.

    mkimage.py --rootfs DIR --out IMAGE.tar --tag NAME:TAG [--tag ...]
               [--entrypoint JSON] [--cmd JSON] [--env K=V ...]

The output is a function of the input tree alone: entries sorted, owned by
0:0, mtime 0, no hard links, so the same inputs give the same image digest.
File modes and symlink targets are kept as they are in DIR.
"""
import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def normalized(info):
    """Strips everything host-specific from a tar entry."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def rootfs_entries(rootfs):
    """Every path under rootfs, relative, parents before children, sorted."""
    found = []
    for parent, dirs, files in os.walk(rootfs):
        dirs.sort()
        rel = os.path.relpath(parent, rootfs)
        for name in dirs + sorted(files):
            found.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(found, key=lambda p: p.split(os.sep))


def write_layer(rootfs, out):
    """Writes the layer tar of rootfs to the open binary file out."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in rootfs_entries(rootfs):
            path = os.path.join(rootfs, rel)
            info = normalized(tar.gettarinfo(path, arcname=rel))
            if info.islnk():
                sys.exit(f"mkimage.py: {path} is a hard link; copy it instead")
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif info.isdir() or info.issym():
                tar.addfile(info)
            else:
                sys.exit(f"mkimage.py: {path}: only files, directories and symlinks")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_bytes(tar, name, data):
    info = normalized(tarfile.TarInfo(name))
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def image_config(args, diff_id):
    config = {"Env": [PATH_ENV] + args.env, "WorkingDir": "/"}
    if args.entrypoint is not None:
        config["Entrypoint"] = json.loads(args.entrypoint)
    if args.cmd is not None:
        config["Cmd"] = json.loads(args.cmd)
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "ci/cluster/mkimage.py"}],
    }


def canonical_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rootfs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", action="append", required=True)
    parser.add_argument("--entrypoint", help="JSON list")
    parser.add_argument("--cmd", help="JSON list")
    parser.add_argument("--env", action="append", default=[])
    args = parser.parse_args()

    out_dir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        layer_path = os.path.join(work, "layer.tar")
        with open(layer_path, "wb") as layer:
            write_layer(args.rootfs, layer)
        diff_id = sha256_file(layer_path)
        config = canonical_json(image_config(args, diff_id))
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = [{"Config": config_name, "RepoTags": args.tag,
                     "Layers": [f"{diff_id}/layer.tar"]}]

        partial = os.path.join(work, "image.tar")
        with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = normalized(tarfile.TarInfo(diff_id))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
            info = normalized(tar.gettarinfo(layer_path, arcname=f"{diff_id}/layer.tar"))
            info.mode = 0o644
            with open(layer_path, "rb") as f:
                tar.addfile(info, f)
            add_bytes(tar, config_name, config)
            add_bytes(tar, "manifest.json", canonical_json(manifest))
        # Readers never see a half-written archive, even with two builds at once.
        os.replace(partial, args.out)
    print(f"{args.out}: layer sha256:{diff_id}, config {config_name}")


if __name__ == "__main__":
    main()
