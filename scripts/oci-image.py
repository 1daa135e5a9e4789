#!/usr/bin/env python3
"""Writes a single-layer OCI image archive (an OCI image layout in a tar file) from a directory.

No Docker daemon, no registry, no build tool: the layer is the directory as a tar, the config
and manifest are JSON, and everything is content-addressed by SHA-256. The output loads with
`ctr -n k8s.io images import` (containerd) and `buildah pull oci-archive:FILE`. It is
reproducible: entries are sorted, owned by root, dated --created, so the same files give the
same image digest.

Usage: oci-image.py ROOTFS OUTPUT.tar --ref REGISTRY/NAME:TAG --entrypoint /usr/bin/x
       [--cmd=ARG ...] [--created 2025-01-01T00:00:00Z]
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
from datetime import datetime, timezone


def layer_tar(rootfs: str, mtime: int) -> bytes:
    """The directory as an uncompressed tar, deterministic (sorted, root-owned, fixed dates)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(dirpath, name)
                arcname = os.path.relpath(path, rootfs)
                info = tar.gettarinfo(path, arcname)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = mtime
                info.pax_headers = {}
                if stat.S_ISREG(os.lstat(path).st_mode):
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return out.getvalue()


def blob(blobs: dict, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rootfs")
    parser.add_argument("output")
    parser.add_argument("--ref", required=True, help="image reference, REGISTRY/NAME:TAG")
    parser.add_argument("--entrypoint", required=True)
    parser.add_argument("--cmd", action="append", default=[], help="default arguments (repeat)")
    parser.add_argument("--created", default="1970-01-01T00:00:00Z")
    args = parser.parse_args()
    if not os.path.isdir(args.rootfs):
        print(f"oci-image: {args.rootfs} is not a directory", file=sys.stderr)
        return 1
    tag = args.ref.rsplit(":", 1)[-1] if ":" in args.ref.rsplit("/", 1)[-1] else "latest"
    created = datetime.strptime(args.created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)

    blobs: dict = {}
    tar_bytes = layer_tar(args.rootfs, int(created.timestamp()))
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    # mtime=0 in the gzip header too, for reproducibility.
    layer = gzip.compress(tar_bytes, compresslevel=6, mtime=0)
    layer_digest = blob(blobs, layer)
    config = {
        "created": args.created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [args.entrypoint],
            "Env": ["PATH=/usr/bin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": args.created, "created_by": "scripts/oci-image.py"}],
    }
    if args.cmd:
        config["config"]["Cmd"] = args.cmd
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = blob(blobs, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": len(layer),
            }
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = blob(blobs, manifest_bytes)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                # containerd names the imported image after the first; OCI tools use the second.
                "annotations": {
                    "io.containerd.image.name": args.ref,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True, separators=(",", ":")).encode(),
    }
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data

    tmp = args.output + ".partial"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as out:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            out.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            out.addfile(info, io.BytesIO(files[name]))
    os.replace(tmp, args.output)
    print(f"{args.output}: {args.ref} manifest {manifest_digest}, layer {len(layer) >> 20} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
