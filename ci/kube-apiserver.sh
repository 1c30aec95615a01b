#!/usr/bin/env bash
# A real Kubernetes API server on loopback for integration tests: kube-apiserver
# v1.20.2, built offline from Debian's `kubernetes` source package, plus
# Debian's etcd. No controller-manager, scheduler or kubelet.
#
#   bash ci/kube-apiserver.sh build                  install packages, build and cache the binary (once)
#   bash ci/kube-apiserver.sh up [DIR]               start etcd + kube-apiserver, write kubeconfigs
#   bash ci/kube-apiserver.sh down [DIR]             stop both (and wait), remove DIR
#   bash ci/kube-apiserver.sh stop-apiserver [DIR]   stop only kube-apiserver; etcd keeps the data
#   bash ci/kube-apiserver.sh start-apiserver [DIR]  start it again and wait for /readyz
#   bash ci/kube-apiserver.sh env [DIR]              print `export KUBECONFIG=DIR/admin.kubeconfig`
#
# DIR defaults to /tmp/weft-kube. After `up` it holds:
#   admin.kubeconfig  user admin, group system:masters (its token also in admin.token)
#   weft.kubeconfig   token weft-agent-token: user system:serviceaccount:kube-system:weft,
#                     groups system:serviceaccounts and system:serviceaccounts:kube-system.
#                     No RBAC binding: tests grant it what the agent needs.
#   etcd.log, kube-apiserver.log, *.pid, etcd/ (data), certs/, tokens.csv, sa.key
# The API server listens on https://127.0.0.1:16443 (self-signed; the kubeconfigs
# skip TLS verification), token auth, RBAC, ServiceAccount admission disabled,
# privileged containers allowed (as kubeadm does).
# etcd listens on http://127.0.0.1:12379 (peer 12380) with --unsafe-no-fsync.
#
# The binary is cached outside the clone, in ${WEFT_CACHE:-~/.cache/weft}/kube/bin
# (shared with ci/cluster.sh); a cold `build` takes about 5 min on 2 cores and
# ~1.5 GB of scratch disk, freed after, plus the Go build cache kept beside it.
# KUBE_APISERVER=path overrides the binary used by up/start-apiserver.
# Needs root and Debian bookworm (apt). up/down need only etcd, openssl and curl
# (no kubectl); `build` also makes sure kubectl exists (kubernetes-client).
set -euo pipefail

ORIG_PWD=$PWD
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."

API_PORT=16443
ETCD_PORT=12379
ETCD_PEER_PORT=12380
SERVER=https://127.0.0.1:$API_PORT
WEFT_TOKEN=weft-agent-token
WEFT_USER=system:serviceaccount:kube-system:weft
READY_TIMEOUT=60
MARKER=.weft-kube

log() { echo "kube-apiserver.sh: $*" >&2; }
die() { log "$*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- build

# shellcheck source=ci/cluster/kube-build.sh
. "$PWD/ci/cluster/kube-build.sh"
CACHED_BIN=$KUBE_CACHE/bin/kube-apiserver
BIN=${KUBE_APISERVER:-$CACHED_BIN}

# Installs, in one go, what up/down need, kubectl, and any packages given.
ensure_packages() {
  local need=("$@")
  command -v etcd >/dev/null || need+=(etcd-server)
  command -v openssl >/dev/null || need+=(openssl)
  command -v curl >/dev/null || need+=(curl)
  command -v kubectl >/dev/null || need+=(kubernetes-client)
  [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
}

build() {
  local t
  t=$(now)
  [ -x "$CACHED_BIN" ] || [ "$(id -u)" = 0 ] || die "building kube-apiserver needs root (apt-get)"
  ensure_packages
  kube_build kube-apiserver
  log "kube-apiserver ready: $CACHED_BIN ($(du -h "$CACHED_BIN" | cut -f1)), $(since "$t") s"
}

# ---------------------------------------------------------------- processes

# Prints the pid of DIR/NAME.pid if that process is alive and was started by
# spawn NAME DIR (its environment holds the tag; guards against pid reuse).
alive_pid() {
  local name=$1 dir=$2 pid
  pid=$(cat "$dir/$name.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  grep -qxF "WEFT_KUBE_PROC=$name@$dir" < <(tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ") || return 1
  echo "$pid"
}

alive() { alive_pid "$1" "$2" >/dev/null; }

# Starts CMD detached (own session), pid in DIR/NAME.pid, output in DIR/NAME.log;
# returns once the process has exec'd CMD.
spawn() {
  local name=$1 dir=$2 pid
  shift 2
  rm -f "$dir/$name.pid"
  # shellcheck disable=SC2016 # $$ and $@ are for the inner bash
  WEFT_KUBE_PROC=$name@$dir setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/$name.pid" "$@" \
    </dev/null >>"$dir/$name.log" 2>&1 &
  for _ in $(seq 100); do
    pid=$(cat "$dir/$name.pid" 2>/dev/null || true)
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" != bash ] && return 0
    sleep 0.05
  done
  fail "$dir" "$name did not start"
}

# Stops NAME (SIGTERM, SIGKILL after 15 s) and waits until it is gone.
stop() {
  local name=$1 dir=$2 pid
  if pid=$(alive_pid "$name" "$dir"); then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do alive "$name" "$dir" || break; sleep 0.1; done
    if alive "$name" "$dir"; then
      log "$name ($pid) ignored SIGTERM, killing"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 50); do alive "$name" "$dir" || break; sleep 0.1; done
    fi
    alive "$name" "$dir" && die "$name ($pid) would not die"
    log "stopped $name ($pid)"
  fi
  rm -f "$dir/$name.pid"
}

port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    die "127.0.0.1:$1 is already in use (another cluster? try: bash ci/kube-apiserver.sh down)"
  fi
}

# Prints the logs, stops both processes (DIR and logs stay), exits.
fail() {
  local dir=$1
  shift
  log "$*; last log lines:"
  echo "----- $dir/etcd.log" >&2
  tail -n 30 "$dir/etcd.log" >&2 2>/dev/null || true
  echo "----- $dir/kube-apiserver.log" >&2
  tail -n 80 "$dir/kube-apiserver.log" >&2 2>/dev/null || true
  stop kube-apiserver "$dir"
  stop etcd "$dir"
  exit 1
}

# ---------------------------------------------------------------- cluster

make_credentials() {
  local dir=$1
  openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  openssl rand -hex 16 >"$dir/admin.token"
  cat >"$dir/tokens.csv" <<EOF
$(cat "$dir/admin.token"),admin,admin,"system:masters"
$WEFT_TOKEN,$WEFT_USER,weft,"system:serviceaccounts,system:serviceaccounts:kube-system"
EOF
}

start_etcd() {
  local dir=$1 deadline=$((SECONDS + 20))
  spawn etcd "$dir" etcd --name weft --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "weft=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync
  until [[ "$(curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" || true)" == *'"health":"true"'* ]]; do
    alive etcd "$dir" || fail "$dir" "etcd exited"
    [ $SECONDS -lt $deadline ] || fail "$dir" "etcd not healthy after 20 s"
    sleep 0.1
  done
}

wait_apiserver() {
  local dir=$1 deadline=$((SECONDS + READY_TIMEOUT)) token
  token=$(cat "$dir/admin.token")
  until [ "$(curl -sk --max-time 2 -H "Authorization: Bearer $token" "$SERVER/readyz" || true)" = ok ]; do
    alive kube-apiserver "$dir" || fail "$dir" "kube-apiserver exited"
    [ $SECONDS -lt $deadline ] || fail "$dir" "kube-apiserver not ready after $READY_TIMEOUT s"
    sleep 0.2
  done
}

start_apiserver() {
  local dir=$1 t
  t=$(now)
  [ -x "$BIN" ] || die "no $BIN: run 'bash ci/kube-apiserver.sh build' first"
  alive etcd "$dir" || die "etcd is not running in $dir (run up first)"
  if alive kube-apiserver "$dir"; then
    log "kube-apiserver already running"
    return 0
  fi
  port_free "$API_PORT"
  spawn kube-apiserver "$dir" "$BIN" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --advertise-address=127.0.0.1 --bind-address=127.0.0.1 --secure-port="$API_PORT" \
    --cert-dir="$dir/certs" --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$dir/sa.pub" --service-account-signing-key-file="$dir/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 --token-auth-file="$dir/tokens.csv" \
    --authorization-mode=RBAC --disable-admission-plugins=ServiceAccount \
    --allow-privileged=true
  wait_apiserver "$dir"
  log "kube-apiserver ready at $SERVER in $(since "$t") s"
}

# Prints the HTTP status of an admin request: METHOD PATH [JSON body].
api_status() {
  local dir=$1 method=$2 path=$3 body=${4:-}
  curl -sk -o /dev/null -w '%{http_code}' --max-time 10 -X "$method" \
    -H "Authorization: Bearer $(cat "$dir/admin.token")" -H 'Content-Type: application/json' \
    ${body:+--data "$body"} "$SERVER$path" || true
}

ensure_namespace() {
  local dir=$1 ns=$2 code
  [ "$(api_status "$dir" GET "/api/v1/namespaces/$ns")" = 200 ] && return 0
  code=$(api_status "$dir" POST /api/v1/namespaces \
    "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$ns\"}}")
  case $code in
    201 | 409) log "created namespace $ns" ;;
    *) fail "$dir" "creating namespace $ns: HTTP $code" ;;
  esac
}

# write_kubeconfig FILE USER TOKEN [NAMESPACE]
write_kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: weft-test
  cluster:
    server: $SERVER
    insecure-skip-tls-verify: true
users:
- name: $2
  user:
    token: $3
contexts:
- name: $2@weft-test
  context:
    cluster: weft-test
    user: $2
    namespace: ${4:-default}
current-context: $2@weft-test
EOF
}

# Removes a DIR left by an earlier run; refuses to touch a folder that is not ours.
reset_dir() {
  local dir=$1
  if [ -e "$dir" ]; then
    [ -e "$dir/$MARKER" ] || [ -z "$(ls -A "$dir")" ] || die "$dir exists and is not a weft-kube folder"
    rm -rf "$dir"
  fi
  mkdir -p "$dir"
  touch "$dir/$MARKER"
}

up() {
  local dir=$1 t
  t=$(now)
  [ -x "$BIN" ] || die "no $BIN: run 'bash ci/kube-apiserver.sh build' first"
  command -v etcd >/dev/null || die "no etcd: run 'bash ci/kube-apiserver.sh build' first"
  alive etcd "$dir" && die "already up in $dir (run down first)"
  port_free "$API_PORT"
  port_free "$ETCD_PORT"
  port_free "$ETCD_PEER_PORT"
  reset_dir "$dir"
  make_credentials "$dir"
  start_etcd "$dir"
  start_apiserver "$dir"
  ensure_namespace "$dir" kube-system
  write_kubeconfig "$dir/admin.kubeconfig" admin "$(cat "$dir/admin.token")"
  write_kubeconfig "$dir/weft.kubeconfig" weft "$WEFT_TOKEN" kube-system
  log "up in $(since "$t") s: $dir/admin.kubeconfig, $dir/weft.kubeconfig"
}

down() {
  local dir=$1
  stop kube-apiserver "$dir"
  stop etcd "$dir"
  if [ -e "$dir/$MARKER" ]; then
    rm -rf "$dir"
  elif [ -e "$dir" ]; then
    log "not removing $dir: not a weft-kube folder"
  fi
}

print_env() {
  [ -f "$1/admin.kubeconfig" ] || log "warning: no $1/admin.kubeconfig (run up first)"
  echo "export KUBECONFIG=$1/admin.kubeconfig"
}

usage() {
  sed -n '2,/^set -euo pipefail/p' "$SELF" | grep '^#' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

main() {
  local cmd=${1:-} dir=${2:-/tmp/weft-kube}
  case $dir in /*) ;; *) dir=$ORIG_PWD/$dir ;; esac
  case $cmd in
    build) build ;;
    up) up "$dir" ;;
    down) down "$dir" ;;
    stop-apiserver) stop kube-apiserver "$dir" ;;
    start-apiserver) start_apiserver "$dir" ;;
    env) print_env "$dir" ;;
    *) usage ;;
  esac
}

main "$@"
