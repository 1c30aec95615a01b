# shellcheck shell=bash
# The container images of the local cluster (ci/cluster.sh sources this file),
# built without a container engine or a registry:
#
#   k8s.gcr.io/pause:3.2                       the sandbox image ($KUBE_CACHE/bin/pause)
#   k8s.gcr.io/e2e-test-images/agnhost:2.21    the e2e suite's agnhost: /agnhost, dash
#                                              as /bin/sh, Debian's curl, nc (openbsd),
#                                              ip, ss and wget, busybox for the rest
#   docker.io/library/busybox:{1.28,1.29,latest}  Debian's busybox-static, every applet
#   ghcr.io/weft-net/weft:latest (and :VERSION) weft itself, from ci/image.sh
#
# images_build          builds what is missing or stale; the third-party images
#                       are docker-archives in $WEFT_CACHE/images, keyed on the
#                       sha256 of everything that goes into them (binaries,
#                       shared libraries, these scripts), so a rebuild is a
#                       no-op until an input changes. weft's image is rebuilt
#                       by ci/image.sh every time (cargo decides what changed)
#                       into this clone's .cache/image/weft-oci.tar.
# images_import SOCKET  imports all of them into the containerd at SOCKET
#                       (namespace k8s.io, unpacked) and checks their names.
#
# Needs from the caller: log, die, now, since, ROOT, WEFT_CACHE, KUBE_CACHE,
# and errexit (set -e) in force where these functions are called.
# Needs on the host: python3, ctr, busybox-static, dash, curl, netcat-openbsd,
# iproute2, wget (what ci/image.sh needs for weft's image: it installs that).

PAUSE_IMAGE=k8s.gcr.io/pause:3.2
AGNHOST_IMAGE=k8s.gcr.io/e2e-test-images/agnhost:2.21
# 1.28 for the tutorials, 1.29 is what the 1.20 e2e suite names, latest is
# what a bare `image: busybox` means to containerd.
BUSYBOX_IMAGES=(docker.io/library/busybox:1.28 docker.io/library/busybox:1.29
    docker.io/library/busybox:latest)
WEFT_REPO=ghcr.io/weft-net/weft
IMAGE_WEFT=$WEFT_REPO:latest

images_dir() { echo "$WEFT_CACHE/images"; }
# weft's image belongs to this clone (it is the code under test), not to the
# cache shared by every clone.
images_weft_tar() { echo "$ROOT/.cache/image/weft-oci.tar"; }

# The shared libraries FILEs load, as ldd names them (the dynamic loader
# included), one path a line, no duplicates.
images_libs() { # FILE...
    local f out
    for f in "$@"; do
        [ -e "$f" ] || die "images: $f missing"
        # ldd fails on static binaries ("not a dynamic executable"): no libraries.
        out=$(ldd "$f" 2>/dev/null) || continue
        ! grep -q 'not found' <<<"$out" || die "images: $f needs a library that is missing: $out"
        awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' <<<"$out"
    done | awk '!seen[$0]++'
}

# Copies each file to the same path under ROOTFS, following symlinks.
images_copy() { # ROOTFS FILE...
    local rootfs=$1 f
    shift
    for f in "$@"; do
        mkdir -p "$rootfs$(dirname "$f")"
        cp -L --preserve=mode "$f" "$rootfs$f"
    done
}

# Symlinks /bin/APPLET -> busybox for each applet of the host's busybox
# (the one copied in), except the names given.
images_busybox_applets() { # ROOTFS EXCEPT...
    local rootfs=$1 applet
    shift
    local except=" $* "
    for applet in $(busybox --list); do
        case "$except busybox " in *" $applet "*) continue ;; esac
        ln -s busybox "$rootfs/bin/$applet"
    done
}

images_etc() { # ROOTFS: users and name lookup for curl, id, whoami, getent
    local rootfs=$1
    mkdir -p "$rootfs/etc" "$rootfs/root"
    install -d -m 1777 "$rootfs/tmp"
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
        'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$rootfs/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$rootfs/etc/group"
    printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"
}

images_rootfs_pause() { # ROOTFS
    install -m 0755 "$KUBE_CACHE/bin/pause" "$1/pause"
}

images_inputs_pause() { echo "$KUBE_CACHE/bin/pause"; }

# What the e2e suite runs inside agnhost through /bin/sh -c (test/e2e/network,
# test/e2e/framework/network): curl, `nc -u -w -p` (busybox's nc has no -u,
# and busybox sh would run its own nc applet before any nc on PATH, hence
# dash as /bin/sh), `ss -ant46` (hostexec pods), `wget -q -T 1 -O -` (GNU
# wget: Debian's busybox-static 1.35 has no wget timeout and -T segfaults),
# seq, date, grep, tail, test, hostname, cat; /agnhost with its subcommands
# (netexec, connect, ...). Upstream's agnhost is Alpine with curl,
# netcat-openbsd and iproute2 too.
# PATH-IN-IMAGE:HOST-COMMAND, the host's binary copied with its libraries.
AGNHOST_TOOLS=(/bin/busybox:busybox /bin/dash:dash /usr/bin/curl:curl
    /usr/bin/nc:nc /usr/bin/ss:ss /usr/sbin/ip:ip /usr/bin/wget:wget)

images_tool_paths() { # the host binaries of AGNHOST_TOOLS, symlinks resolved
    local tool path
    for tool in "${AGNHOST_TOOLS[@]}"; do
        path=$(command -v "${tool#*:}") || die "images: ${tool#*:} missing (apt-get install it)"
        readlink -f "$path"
    done
}

images_inputs_agnhost() {
    local tools libs
    tools=$(images_tool_paths)
    libs=$(images_libs $tools)
    printf '%s\n' "$KUBE_CACHE/bin/agnhost" "$tools" "$libs"
}

images_rootfs_agnhost() { # ROOTFS
    local rootfs=$1 i paths libs
    install -m 0755 "$KUBE_CACHE/bin/agnhost" "$rootfs/agnhost"
    ln -s agnhost "$rootfs/agnhost-2"
    mkdir -p "$rootfs/uploads"
    mapfile -t paths < <(images_tool_paths)
    for i in "${!AGNHOST_TOOLS[@]}"; do
        install -D -m 0755 "${paths[i]}" "$rootfs${AGNHOST_TOOLS[i]%%:*}"
    done
    libs=$(images_libs "${paths[@]}")
    images_copy "$rootfs" $libs
    ln -s dash "$rootfs/bin/sh"
    images_busybox_applets "$rootfs" sh ash nc ip ss wget
    images_etc "$rootfs"
}

images_inputs_busybox() { readlink -f "$(command -v busybox)"; }

images_rootfs_busybox() { # ROOTFS
    local rootfs=$1
    mkdir -p "$rootfs/bin"
    install -m 0755 "$(images_inputs_busybox)" "$rootfs/bin/busybox"
    images_busybox_applets "$rootfs"
    images_etc "$rootfs"
}

# Builds $WEFT_CACHE/images/NAME.tar unless NAME.key already holds the
# sha256 of its inputs (listed by images_inputs_NAME) and of this library.
images_build_one() { # NAME ENTRYPOINT-JSON CMD-JSON TAG...
    local name=$1 entrypoint=$2 cmd=$3
    shift 3
    local dir tar key tags=() t start
    dir=$(images_dir)
    tar=$dir/$name.tar
    key=$({
        printf '%s\n' "$entrypoint" "$cmd" "$@"
        images_inputs_"$name" | sort | xargs sha256sum
        sha256sum "$ROOT/ci/cluster/images.sh" "$ROOT/ci/cluster/mkimage.py"
    } | sha256sum | cut -d' ' -f1)
    if [ -f "$tar" ] && [ "$(cat "$dir/$name.key" 2>/dev/null)" = "$key" ]; then
        return
    fi
    start=$(now)
    mkdir -p "$dir"
    for t in "$@"; do tags+=(--tag "$t"); done
    rm -f "$dir/$name.key"
    # A subshell, so that its trap removes the staging tree however it ends.
    # Not `( ... ) || die`: errexit is off inside a tested command.
    (
        set -e
        work=$(mktemp -d "$dir/.$name.XXXXXX")
        trap 'rc=$?; rm -rf "$work"; [ $rc = 0 ] || log "images: building $name failed"' EXIT
        mkdir "$work/rootfs"
        images_rootfs_"$name" "$work/rootfs"
        python3 "$ROOT/ci/cluster/mkimage.py" --rootfs "$work/rootfs" --out "$tar" \
            --entrypoint "$entrypoint" --cmd "$cmd" "${tags[@]}" >/dev/null
    )
    echo "$key" >"$dir/$name.key"
    log "image $* built in $(since "$start")s: $(du -h "$tar" | cut -f1)"
}

images_build_weft() {
    local start out
    start=$(now)
    out=$ROOT/.cache/image/build.log
    mkdir -p "$(dirname "$out")"
    bash "$ROOT/ci/image.sh" --tar >"$out" 2>&1 ||
        { tail -n 30 "$out" >&2; die "images: ci/image.sh failed (log: $out)"; }
    log "image $IMAGE_WEFT built by ci/image.sh in $(since "$start")s: $(du -h "$(images_weft_tar)" | cut -f1)"
}

images_build() {
    local start
    start=$(now)
    [ -x "$KUBE_CACHE/bin/pause" ] || die "images: $KUBE_CACHE/bin/pause missing (build the kube binaries first)"
    [ -x "$KUBE_CACHE/bin/agnhost" ] || die "images: $KUBE_CACHE/bin/agnhost missing (build the kube binaries first)"
    images_build_one pause '["/pause"]' '[]' "$PAUSE_IMAGE"
    images_build_one agnhost '["/agnhost"]' '["pause"]' "$AGNHOST_IMAGE"
    images_build_one busybox '[]' '["sh"]' "${BUSYBOX_IMAGES[@]}"
    images_build_weft
    log "images ready in $(since "$start")s"
}

# The archives and how ctr names what they hold: docker-archives carry full
# names; weft's OCI layout only tags, which --base-name completes.
images_archives() {
    local dir
    dir=$(images_dir)
    printf '%s\t%s\n' "$dir/pause.tar" "" "$dir/agnhost.tar" "" "$dir/busybox.tar" "" \
        "$(images_weft_tar)" "$WEFT_REPO"
}

images_import() { # SOCKET
    local socket=$1 start tar base listed name
    start=$(now)
    while IFS=$'\t' read -r tar base; do
        [ -f "$tar" ] || die "images: $tar missing (images_build first)"
        ctr -a "$socket" -n k8s.io images import ${base:+--base-name "$base"} "$tar" >/dev/null ||
            die "images: importing $tar into $socket failed"
    done < <(images_archives)
    listed=$(ctr -a "$socket" -n k8s.io images ls -q)
    for name in "$PAUSE_IMAGE" "$AGNHOST_IMAGE" "${BUSYBOX_IMAGES[@]}" "$IMAGE_WEFT"; do
        grep -qxF "$name" <<<"$listed" || die "images: $name not listed by the containerd at $socket after import"
    done
    log "images imported into $socket in $(since "$start")s"
}
