# shellcheck shell=bash
# Building Kubernetes v1.20.2 offline from Debian's `kubernetes` source
# package (the whole tree with vendor/), in GOPATH mode. Sourced by
# ci/kube-apiserver.sh and ci/cluster.sh; expects log, die, now, since.
#
# Binaries are cached in $KUBE_CACHE/bin, outside the clone, together with
# the Go build cache ($KUBE_CACHE/gocache, ~1.7 GB): with it kept, a rebuild
# of everything takes seconds. WEFT_CACHE moves the whole cache.

WEFT_CACHE=${WEFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/weft}
KUBE_CACHE=$WEFT_CACHE/kube
K8S_VERSION=v1.20.2
APT_UPDATED=

apt_update_once() {
  [ -n "$APT_UPDATED" ] && return 0
  log "apt-get update"
  apt-get update -qq
  APT_UPDATED=1
}

missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"
  done
}

apt_install() {
  local missing
  missing=$(missing_pkgs "$@")
  [ -z "$missing" ] && return 0
  apt_update_once
  log "apt-get install" "$missing"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

have_deb_src() {
  grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/
}

ensure_deb_src() {
  local f=/etc/apt/sources.list.d/debian.sources
  have_deb_src && return 0
  [ -f "$f" ] || die "no deb-src entry, and no $f to derive one from"
  log "adding deb-src entry /etc/apt/sources.list.d/debian-src.sources"
  sed 's/^Types: deb$/Types: deb-src/' "$f" >/etc/apt/sources.list.d/debian-src.sources
  APT_UPDATED= # the Sources index is new: update again
}

# The tree, unpacked as $1/gopath/src/k8s.io/kubernetes.
kube_tree() { echo "$1/gopath/src/k8s.io/kubernetes"; }

fetch_source() {
  local w=$1
  apt-cache showsrc kubernetes 2>/dev/null | grep '^Package: kubernetes$' >/dev/null || {
    APT_UPDATED=
    apt_update_once
  }
  mkdir -p "$w/dl" "$w/gopath/src/k8s.io"
  (cd "$w/dl" && apt-get source -qq --download-only kubernetes 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  ls "$w"/dl/kubernetes_*.dsc >/dev/null 2>&1 || die "apt-get source kubernetes failed"
  dpkg-source -q -x --no-check "$w"/dl/kubernetes_*.dsc "$(kube_tree "$w")" >/dev/null
  rm -rf "$w/dl"
}

# The vendored reflect2 1.0.1 crashes with Go >= 1.18 (nil dereference or SIGSEGV
# whenever json-iterator meets a map, e.g. GET /api/v1/nodes). Swap in Debian's
# reflect2 1.0.2 + json-iterator 1.1.12, as upstream Kubernetes did.
patch_jsoniter() {
  local w=$1 src=$1/dl/x/usr/share/gocode/src/github.com
  local vendor
  vendor=$(kube_tree "$w")/vendor/github.com
  mkdir -p "$w/dl"
  (cd "$w/dl" && apt-get download -qq golang-github-modern-go-reflect2-dev \
    golang-github-json-iterator-go-dev 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  for deb in "$w"/dl/*.deb; do dpkg-deb -x "$deb" "$w/dl/x"; done
  [ -d "$src/modern-go/reflect2" ] && [ -d "$src/json-iterator/go" ] || die "apt-get download of reflect2/json-iterator failed"
  rm -rf "$vendor/modern-go/reflect2" "$vendor/json-iterator/go"
  cp -r "$src/modern-go/reflect2" "$vendor/modern-go/reflect2"
  cp -r "$src/json-iterator/go" "$vendor/json-iterator/go"
  rm -rf "$w/dl"
}

# Packages with openapi-gen tags: the input of pkg/generated/openapi, which the
# source package does not ship. vendor/k8s.io/* are symlinks to staging/: -R.
openapi_dirs() {
  {
    grep -rl --include='*.go' '+k8s:openapi-gen=' pkg cmd plugin || true
    grep -Rl --include='*.go' '+k8s:openapi-gen=' vendor/k8s.io/ || true
  } | grep -v 'vendor/k8s.io/code-generator/\|vendor/k8s.io/sample-apiserver/\|_test.go' \
    | xargs -n1 dirname | LC_ALL=C sort -u | sed 's#^#k8s.io/kubernetes/#' | paste -sd,
}

# Without these, /version says v0.0.0-master with empty major/minor, and
# version-gated e2e tests trip on it. GOPATH mode: the vendored paths.
version_ldflags() {
  local p f=(-s -w) v=k8s.io/kubernetes/vendor/k8s.io
  for p in k8s.io/kubernetes/pkg/version $v/client-go/pkg/version $v/component-base/version; do
    f+=(-X "$p.gitVersion=$K8S_VERSION" -X "$p.gitMajor=1" -X "$p.gitMinor=20" -X "$p.gitTreeState=clean")
  done
  echo "${f[*]}"
}

# Runs "$@" in the tree with the Go environment of the build (GOPATH mode:
# module mode with -mod=vendor fails on this tree).
in_tree() (
  local w=$1
  shift
  export GOPATH=$w/gopath GOCACHE=$KUBE_CACHE/gocache GO111MODULE=off CGO_ENABLED=0 GOFLAGS='' GOPROXY=off
  cd "$(kube_tree "$w")"
  "$@"
)

gen_openapi() {
  local w=$1 t
  t=$(now)
  in_tree "$w" go build -o "$w/bin/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  in_tree "$w" bash -c '"$0" -i "$1" -p k8s.io/kubernetes/pkg/generated/openapi \
    -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$2"' \
    "$w/bin/openapi-gen" "$(in_tree "$w" openapi_dirs)" "$w/openapi-report.txt"
  # without the apiextensions models the server exits at startup
  grep -q '"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1.CustomResourceDefinition"' \
    "$(kube_tree "$w")/pkg/generated/openapi/zz_generated.openapi.go" || die "openapi-gen missed the apiextensions models"
  log "openapi-gen done in $(since "$t") s"
}

# e2e.test embeds test/e2e/testing-manifests etc. through go-bindata; the
# source package lacks the generated file (`undefined: Asset`). Same inputs
# as hack/generate-bindata.sh.
gen_bindata() {
  local w=$1
  in_tree "$w" go build -o "$w/bin/go-bindata" ./vendor/github.com/go-bindata/go-bindata/go-bindata
  in_tree "$w" "$w/bin/go-bindata" -nometadata -o test/e2e/generated/bindata.go -pkg generated \
    -ignore .jpg -ignore .png -ignore .md -ignore 'BUILD(\.bazel)?' \
    test/conformance/testdata/... test/e2e/testing-manifests/... test/e2e_node/testing-manifests/... \
    test/images/... test/fixtures/...
}

# go_build W NAME PACKAGE: one binary into $KUBE_CACHE/bin (atomic rename).
go_build() {
  local w=$1 name=$2 pkg=$3 t
  t=$(now)
  if [ "$name" = e2e.test ]; then
    in_tree "$w" go test -c -ldflags "$(version_ldflags)" -o "$w/bin/$name" "$pkg"
  else
    in_tree "$w" go build -ldflags "$(version_ldflags)" -o "$w/bin/$name" "$pkg"
  fi
  mkdir -p "$KUBE_CACHE/bin"
  cp "$w/bin/$name" "$KUBE_CACHE/bin/$name.tmp"
  mv "$KUBE_CACHE/bin/$name.tmp" "$KUBE_CACHE/bin/$name"
  log "built $name in $(since "$t") s"
}

# kube_build NAME...: builds the named components that are not cached yet.
# Names: kube-apiserver kube-controller-manager kube-scheduler kubelet
# kube-proxy kubectl e2e.test agnhost ginkgo (the CLI that runs e2e.test in
# parallel) pause (static C, from build/pause).
kube_build() {
  local w=$KUBE_CACHE/build name todo=() t
  t=$(now)
  for name in "$@"; do [ -x "$KUBE_CACHE/bin/$name" ] || todo+=("$name"); done
  [ ${#todo[@]} -eq 0 ] && return 0
  ensure_deb_src
  apt_install golang-go dpkg-dev gcc libc6-dev
  rm -rf "$w"
  mkdir -p "$w/bin"
  fetch_source "$w"
  patch_jsoniter "$w"
  log "source ready in $(since "$t") s; building ${todo[*]}"
  case " ${todo[*]} " in *" kube-apiserver "* | *" kube-controller-manager "*) gen_openapi "$w" ;; esac
  case " ${todo[*]} " in *" e2e.test "*) gen_bindata "$w" ;; esac
  for name in "${todo[@]}"; do
    case $name in
      kube-apiserver | kube-controller-manager | kube-scheduler | kubelet | kube-proxy | kubectl)
        go_build "$w" "$name" "./cmd/$name" ;;
      e2e.test) go_build "$w" e2e.test ./test/e2e ;;
      agnhost) go_build "$w" agnhost ./test/images/agnhost ;;
      ginkgo) go_build "$w" ginkgo ./vendor/github.com/onsi/ginkgo/ginkgo ;;
      pause)
        mkdir -p "$KUBE_CACHE/bin"
        gcc -static -Os -DVERSION=v3.2-weft -o "$KUBE_CACHE/bin/pause.tmp" "$(kube_tree "$w")/build/pause/linux/pause.c"
        strip "$KUBE_CACHE/bin/pause.tmp"
        mv "$KUBE_CACHE/bin/pause.tmp" "$KUBE_CACHE/bin/pause" ;;
      *) die "unknown component $name" ;;
    esac
  done
  chmod -R u+w "$w"
  rm -rf "$w"
  log "built ${todo[*]} in $(since "$t") s"
}
