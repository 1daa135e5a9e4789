# The reservoir image, for your own build tooling and registry: the release binary and the
# shared libraries it links, nothing else (no shell, no package manager). The build context is
# the staged file tree, so the image holds exactly what `make image` puts in its own:
#
#   scripts/image.sh rootfs          # cargo build --release; stages target/image/rootfs
#   docker build -f Dockerfile -t registry.example.com/reservoir:0.1.0 target/image/rootfs
#   (or: buildah bud -f Dockerfile -t ... target/image/rootfs)
#
# Then set the image in deploy/kubernetes/ (see docs/kubernetes.md). `make image-check` builds
# this file with buildah in the tests, so it cannot drift from the staged tree.
FROM scratch
COPY . /
ENTRYPOINT ["/usr/bin/reservoir"]
