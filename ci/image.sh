#!/usr/bin/env bash
# Builds the weft container image without a container engine: static (musl)
# `weft` and `weft-cni` plus deploy/10-weft.conflist in a from-scratch OCI
# image, assembled with umoci. The image holds exactly
#   /weft  /weft-cni  /10-weft.conflist
# with entrypoint /weft and command `router` (deploy/weft.yaml sets its own
# commands: `/weft install-cni` in the init container, `/weft router --kube`).
#
#   bash ci/image.sh [--tar] [--out DIR] [--tag TAG] [--skip-build]
#
#   --out DIR     the OCI layout directory (default .cache/image/weft-oci;
#                 replaced on every run)
#   --tag TAG     image tag (default: the workspace version; `latest` is
#                 always added as a second tag)
#   --tar         also write DIR.tar, the layout as one tarball
#                 (for `podman load`, `kind load image-archive`, `ctr import`)
#   --skip-build  reuse the binaries of the previous build
#
# Env: CARGO_TARGET_DIR (default target), OUT, TAG, TAR=1 (same as the flags),
# STRIP=0 to keep the symbol tables (the binaries are stripped in the image:
# 17 -> 14 MB for weft; panics still name file and line).
# Needs: rustup target x86_64-unknown-linux-musl, musl-gcc (apt musl-tools),
# umoci, file; as root with apt-get the missing ones are installed.
# Checks: both binaries are static, `/weft --version` runs chrooted in the
# image's rootfs (no libc there), `weft install-cni` from the rootfs installs
# its neighbours into a scratch node (then reports them unchanged), and
# skopeo (if installed) reads the layout.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-musl
OUT=${OUT:-.cache/image/weft-oci}
TAG=${TAG:-}
TAR=${TAR:-0}
STRIP=${STRIP:-1}
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --tar) TAR=1; shift ;;
        --skip-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$TAG" ]; then
    TAG=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
    TAG=${TAG:-latest}
fi
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN=$TARGET_DIR/$TARGET/release

need_apt() { # command package
    command -v "$1" >/dev/null && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== apt-get install $2 (for $1)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    else
        echo "image.sh: $1 missing: apt-get install $2" >&2
        exit 1
    fi
}
need_apt umoci umoci
need_apt file file

start=$SECONDS
if [ "$BUILD" = 1 ]; then
    need_apt musl-gcc musl-tools
    if ! rustup target list --installed | grep -qx "$TARGET"; then
        echo "== rustup target add $TARGET"
        rustup target add "$TARGET"
    fi
    echo "== cargo build --release --target $TARGET -p weft -p weft-cni"
    CC_x86_64_unknown_linux_musl=musl-gcc \
        cargo build --release --target "$TARGET" -p weft -p weft-cni
fi
build_seconds=$((SECONDS - start))

for b in weft weft-cni; do
    [ -x "$BIN/$b" ] || { echo "image.sh: $BIN/$b missing (build without --skip-build)" >&2; exit 1; }
    desc=$(file -b "$BIN/$b")
    case "$desc" in
        *"statically linked"*|*"static-pie linked"*) ;;
        *) echo "image.sh: $BIN/$b is not static: $desc" >&2; exit 1 ;;
    esac
    if ldd "$BIN/$b" 2>&1 | grep -q '=>'; then
        echo "image.sh: $BIN/$b links shared libraries:" >&2
        ldd "$BIN/$b" >&2
        exit 1
    fi
    echo "   $b: static, $(stat -c %s "$BIN/$b") bytes"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unpack=()
[ "$(id -u)" = 0 ] || unpack=(--rootless)

echo "== OCI layout $OUT:$TAG"
rm -rf "$OUT" "$OUT.tar"
mkdir -p "$(dirname "$OUT")"
umoci init --layout "$OUT"
umoci new --image "$OUT:$TAG"
umoci unpack "${unpack[@]}" --image "$OUT:$TAG" "$work/bundle"
rootfs=$work/bundle/rootfs
strip=()
[ "$STRIP" = 0 ] || strip=(--strip)
install -m 0755 "${strip[@]}" "$BIN/weft" "$rootfs/weft"
install -m 0755 "${strip[@]}" "$BIN/weft-cni" "$rootfs/weft-cni"
install -m 0644 deploy/10-weft.conflist "$rootfs/10-weft.conflist"
umoci repack --image "$OUT:$TAG" \
    --history.created_by "ci/image.sh: COPY weft weft-cni 10-weft.conflist /" "$work/bundle"
umoci config --image "$OUT:$TAG" \
    --architecture amd64 --os linux \
    --config.entrypoint /weft --config.cmd router \
    --config.label "org.opencontainers.image.title=weft" \
    --config.label "org.opencontainers.image.version=$TAG" \
    --config.label "org.opencontainers.image.licenses=Apache-2.0" \
    --history.created_by "ci/image.sh: ENTRYPOINT [\"/weft\"] CMD [\"router\"]"
[ "$TAG" = latest ] || umoci tag --image "$OUT:$TAG" latest
umoci gc --layout "$OUT"

echo "== checks"
umoci unpack "${unpack[@]}" --image "$OUT:$TAG" "$work/check"
rootfs=$work/check/rootfs
listing=$(cd "$rootfs" && find . -mindepth 1 -printf '%m %p\n' | sort -k2)
expected=$'644 ./10-weft.conflist\n755 ./weft\n755 ./weft-cni'
if [ "$listing" != "$expected" ]; then
    echo "image.sh: unexpected rootfs:" >&2
    echo "$listing" >&2
    exit 1
fi
if [ "$(id -u)" = 0 ]; then
    # Nothing but the three files under /: runs only if truly static.
    version=$(chroot "$rootfs" /weft --version)
else
    version=$("$rootfs/weft" --version)
fi
echo "   /weft --version: $version"
cni_version=$(CNI_COMMAND=VERSION "$rootfs/weft-cni" </dev/null)
echo "   weft-cni VERSION: $cni_version"
# What the init container does, with the sources found beside /weft.
"$rootfs/weft" install-cni --cni-bin-dir "$work/node/opt/cni/bin" \
    --cni-conf-dir "$work/node/etc/cni/net.d" | sed 's/^/   /'
"$rootfs/weft" install-cni --cni-bin-dir "$work/node/opt/cni/bin" \
    --cni-conf-dir "$work/node/etc/cni/net.d" | grep -c '^weft install-cni: unchanged ' | grep -qx 2 \
    || { echo "image.sh: a second install-cni was not a no-op" >&2; exit 1; }
cmp "$rootfs/weft-cni" "$work/node/opt/cni/bin/weft-cni"
if command -v skopeo >/dev/null; then
    skopeo inspect --config "oci:$OUT:$TAG" | jq -c '{architecture, os, config: {Entrypoint: .config.Entrypoint, Cmd: .config.Cmd}}' \
        | sed 's/^/   skopeo: /'
fi

if [ "$TAR" = 1 ]; then
    tar -C "$OUT" -cf "$OUT.tar" .
fi

# Sizes: the layer as pulled (gzip) and every blob the image references.
manifest=$(jq -r --arg t "$TAG" \
    '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
    "$OUT/index.json" | sed 's/^sha256://')
layer=$(jq '[.layers[].size] | add' "$OUT/blobs/sha256/$manifest")
config=$(jq '.config.size' "$OUT/blobs/sha256/$manifest")
total=$((layer + config + $(stat -c %s "$OUT/blobs/sha256/$manifest")))
uncompressed=$(du -cb "$rootfs"/* | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

echo
echo "image  $OUT:$TAG (also :latest)"
echo "size   layer $(mib "$layer") compressed ($layer bytes), $(mib "$uncompressed") unpacked;"
echo "       image total $(mib "$total") ($total bytes: layer + config + manifest)"
if [ "$TAR" = 1 ]; then
    echo "tar    $OUT.tar $(mib "$(stat -c %s "$OUT.tar")")"
fi
echo "build  ${build_seconds}s cargo, $((SECONDS - start))s in all"
cat <<EOF

Load it (deploy/weft.yaml uses ghcr.io/weft-net/weft:latest):
  skopeo copy oci:$OUT:$TAG docker-daemon:ghcr.io/weft-net/weft:latest       # Docker
  skopeo copy oci:$OUT:$TAG containers-storage:ghcr.io/weft-net/weft:latest  # Podman
  skopeo copy oci:$OUT:$TAG docker://REGISTRY/weft:$TAG                      # a registry
  podman load -i $OUT.tar && podman tag <id> ghcr.io/weft-net/weft:latest  # with --tar
As a docker-archive (docker load, kind load image-archive, ctr images import):
  skopeo copy oci:$OUT:$TAG docker-archive:weft.tar:ghcr.io/weft-net/weft:latest
EOF
