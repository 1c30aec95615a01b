#!/usr/bin/env bash
# Installs the reference CNI plugins and builds `cnitool`, a small CNI runtime
# on top of libcni (the library containerd and CRI-O use), offline, from
# Debian bookworm packages only:
#
#   containernetworking-plugins   reference plugins in /usr/lib/cni (bridge,
#                                 host-local, portmap, loopback, tuning, ...)
#   golang-github-appc-cni-dev    libcni + pkg/{invoke,skel,types,version}
#                                 1.1.2 as Go source in /usr/share/gocode
#   golang-go                     Go 1.19
#
# Debian ships no cnitool binary (golang-github-appc-cni-dev has only its
# man page, cnitool.md), so the client below is built with GOPATH mode
# (GO111MODULE=off, GOPROXY=off): libcni 1.1.2 has
# no dependencies outside the standard library, so nothing is downloaded.
#
#   bash ci/cnitool.sh          installs/builds if needed, prints the binary's path
#
# Idempotent: a second run only checks and prints (well under a second).
# From scratch (measured on the 2-vCPU bookworm box, apt lists present): apt-get
# install of the three packages ~10-12 s, go build ~2 s (no -trimpath, so the
# standard library comes precompiled from golang-1.19-go; CGO off, static);
# add apt-get update (~2-5 s) when the lists are missing.
# Output: .cache/cnitool/cnitool (the folder ignores itself via its own
# .gitignore).
#
# cnitool usage (upstream cnitool's interface, plus a few extras):
#   cnitool add|check|del <net-name | path/to/file.conflist|.conf> <netns path>
#   cnitool validate <net-name | file>        plugins exist and support the version
#   cnitool version <plugin type>             the plugin's VERSION answer
# env: CNI_PATH (plugin dirs, default /usr/lib/cni), NETCONFPATH (dir for
# net names, default /etc/cni/net.d), CNI_IFNAME (eth0), CNI_CONTAINERID
# (default: hash of the netns path, as upstream), CNI_ARGS ("K=V;K2=V2"),
# CAP_ARGS (JSON object of capability args, e.g. {"portMappings":[...]}),
# CNI_CACHE_DIR (libcni's result cache, default /var/lib/cni).
# ADD prints the result JSON on stdout; errors go to stderr with exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=$PWD/.cache/cnitool
BIN=$OUT/cnitool
LIBCNI=/usr/share/gocode/src/github.com/containernetworking/cni/libcni
STAMP=$OUT/source.sha256

need_pkgs=()
[ -x /usr/lib/cni/bridge ] || need_pkgs+=(containernetworking-plugins)
[ -d "$LIBCNI" ] || need_pkgs+=(golang-github-appc-cni-dev)
command -v go >/dev/null 2>&1 || [ -x /usr/lib/go/bin/go ] || need_pkgs+=(golang-go)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "cnitool.sh: installing ${need_pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2; then
        apt-get update >&2
        apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2
    fi
fi
export PATH=$PATH:/usr/lib/go/bin

mkdir -p "$OUT/src"
printf '*\n' >"$OUT/.gitignore"

# The client's source, kept here so the script alone can rebuild it.
cat >"$OUT/src/main.go.new" <<'EOF'
// cnitool: a minimal CNI runtime on libcni (same interface as upstream's
// cnitool), for exercising CNI plugins the way containerd/CRI-O do.
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

func env(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func die(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "cnitool: "+format+"\n", a...)
	os.Exit(1)
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: cnitool add|check|del <net|file> <netns>\n"+
		"       cnitool validate <net|file>\n       cnitool version <plugin>")
	os.Exit(2)
}

func loadList(nameOrFile string) *libcni.NetworkConfigList {
	if st, err := os.Stat(nameOrFile); err == nil && !st.IsDir() {
		if strings.HasSuffix(nameOrFile, ".conflist") {
			l, err := libcni.ConfListFromFile(nameOrFile)
			if err != nil {
				die("%s: %v", nameOrFile, err)
			}
			return l
		}
		c, err := libcni.ConfFromFile(nameOrFile)
		if err != nil {
			die("%s: %v", nameOrFile, err)
		}
		l, err := libcni.ConfListFromConf(c)
		if err != nil {
			die("%s: %v", nameOrFile, err)
		}
		return l
	}
	l, err := libcni.LoadConfList(env("NETCONFPATH", "/etc/cni/net.d"), nameOrFile)
	if err != nil {
		die("%v", err)
	}
	return l
}

func main() {
	if len(os.Args) < 3 {
		usage()
	}
	ctx := context.Background()
	cni := libcni.NewCNIConfigWithCacheDir(
		filepath.SplitList(env("CNI_PATH", "/usr/lib/cni")), os.Getenv("CNI_CACHE_DIR"), nil)

	switch os.Args[1] {
	case "version":
		info, err := cni.GetVersionInfo(ctx, os.Args[2])
		if err != nil {
			die("%v", err)
		}
		out, _ := json.Marshal(map[string]interface{}{
			"cniVersion": info.SupportedVersions(), "plugin": os.Args[2]})
		fmt.Println(string(out))
		return
	case "validate":
		l := loadList(os.Args[2])
		caps, err := cni.ValidateNetworkList(ctx, l)
		if err != nil {
			die("validate %s: %v", l.Name, err)
		}
		fmt.Printf("ok: %s (cniVersion %s, %d plugins, capabilities %v)\n",
			l.Name, l.CNIVersion, len(l.Plugins), caps)
		return
	case "add", "check", "del":
	default:
		usage()
	}
	if len(os.Args) < 4 {
		usage()
	}
	l := loadList(os.Args[2])
	netns := os.Args[3]
	if abs, err := filepath.Abs(netns); err == nil {
		netns = abs
	}

	var capArgs map[string]interface{}
	if s := os.Getenv("CAP_ARGS"); s != "" {
		if err := json.Unmarshal([]byte(s), &capArgs); err != nil {
			die("CAP_ARGS: %v", err)
		}
	}
	var args [][2]string
	if s := os.Getenv("CNI_ARGS"); s != "" {
		for _, kv := range strings.Split(s, ";") {
			p := strings.SplitN(kv, "=", 2)
			if len(p) != 2 {
				die("CNI_ARGS: bad pair %q", kv)
			}
			args = append(args, [2]string{p[0], p[1]})
		}
	}
	id := os.Getenv("CNI_CONTAINERID")
	if id == "" {
		id = fmt.Sprintf("%x", sha512.Sum512([]byte(netns)))[:16]
	}
	rt := &libcni.RuntimeConf{
		ContainerID:    id,
		NetNS:          netns,
		IfName:         env("CNI_IFNAME", "eth0"),
		Args:           args,
		CapabilityArgs: capArgs,
	}

	switch os.Args[1] {
	case "add":
		res, err := cni.AddNetworkList(ctx, l, rt)
		if err != nil {
			die("add %s: %v", l.Name, err)
		}
		if res != nil {
			if err := res.Print(); err != nil {
				die("printing result: %v", err)
			}
		}
	case "check":
		if err := cni.CheckNetworkList(ctx, l, rt); err != nil {
			die("check %s: %v", l.Name, err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, l, rt); err != nil {
			die("del %s: %v", l.Name, err)
		}
	}
}
EOF

sum=$( (cat "$OUT/src/main.go.new"; go version; cat "$LIBCNI"/*.go) | sha256sum | cut -d' ' -f1)
if [ -x "$BIN" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$sum" ]; then
    rm -f "$OUT/src/main.go.new"
    echo "$BIN"
    exit 0
fi
mv "$OUT/src/main.go.new" "$OUT/src/main.go"
echo "cnitool.sh: building $BIN (offline, GOPATH mode against Debian's libcni)" >&2
(
    cd "$OUT/src"
    GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH=/usr/share/gocode \
        GOCACHE=$OUT/gocache CGO_ENABLED=0 \
        go build -o "$BIN.tmp" main.go
)
mv "$BIN.tmp" "$BIN"
echo "$sum" >"$STAMP"
echo "$BIN"
