# shellcheck shell=bash
# Machines of the one-machine cluster: each is a network namespace (bound to
# a file under $CLUSTER_DIR/ns, so nothing is added to the host's /run/netns)
# plus a mount and a UTS namespace (hostname = machine name) held open by a
# `sleep` process, in which /sys is the
# namespace's own sysfs (cgroups kept), /var/lib, /var/log and /run are
# private directories (machines/NAME/var-lib, ...; so the node's containerd
# socket is machines/NAME/run/containerd/containerd.sock from outside too), /etc and /opt are overlays over the host's (writes
# stay in the machine), and the host-wide sysctls the kubelet sets are
# private copies. Sourced by ci/cluster.sh.

NS_DIR=$CLUSTER_DIR/ns
UNDERLAY=underlay          # the namespace holding the underlay bridge
UNDERLAY_NET=192.168.1     # .10 control plane, .11.. nodes (the tutorial's)
OUTSIDE_IP=203.0.113.1     # an address outside the cluster, on the control plane
# cgroupRoot of each kubelet: /weft-cluster-NODE (named after CLUSTER_DIR, so
# two clusters can run side by side)
CGROUP_PREFIX=$(basename "$CLUSTER_DIR")

# Host-wide sysctls the kubelet writes at start: each machine gets copies.
KUBELET_SYSCTLS=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes)

machine_dir() { echo "$CLUSTER_DIR/machines/$1"; }
holder_pid() { cat "$(machine_dir "$1")/holder.pid" 2>/dev/null; }

# in_machine NAME CMD...: runs CMD in the machine's network and mount namespaces.
in_machine() {
  local m=$1 pid
  shift
  pid=$(holder_pid "$m") || die "machine $m is not running"
  nsenter -t "$pid" -m -n -u -- "$@"
}

in_net() {
  local ns=$1
  shift
  nsenter --net="$NS_DIR/$ns" -- "$@"
}

# new_netns NAME: a network namespace bound to $NS_DIR/NAME, lo up.
new_netns() {
  mkdir -p "$NS_DIR"
  touch "$NS_DIR/$1"
  unshare --net="$NS_DIR/$1" ip link set lo up
}

# A process whose network namespace is NAME, for `ip link ... netns PID`.
netns_pid() {
  local pid
  nsenter --net="$NS_DIR/$1" sleep 30 </dev/null >/dev/null 2>&1 &
  pid=$!
  sleep 0.05
  echo "$pid"
}

# underlay_port NAME IP: a veth from the underlay bridge into NAME, eth0 = IP/24.
underlay_port() {
  local ns=$1 ip=$2 pid
  pid=$(netns_pid "$ns")
  in_net "$UNDERLAY" ip link add "ul-${ip##*.}" type veth peer eth0 netns "$pid"
  kill "$pid" 2>/dev/null || true
  in_net "$UNDERLAY" ip link set "ul-${ip##*.}" master br0 up
  in_net "$ns" ip addr add "$ip/24" dev eth0
  in_net "$ns" ip link set eth0 up
}

start_underlay() {
  new_netns "$UNDERLAY"
  in_net "$UNDERLAY" ip link add br0 type bridge
  in_net "$UNDERLAY" ip link set br0 up
}

# The mount namespace of a machine, set up by a script run inside it; the
# script ends by exec'ing `sleep infinity` (the holder).
machine_mounts_script() {
  cat <<'EOF'
set -euo pipefail
d=$1
hostname "$2"
shift 2
# sysfs of this network namespace (for /sys/class/net), keeping the cgroup
# hierarchies across it.
mkdir -p "$d/cgroup-aside"
mount --rbind /sys/fs/cgroup "$d/cgroup-aside"
mount -t sysfs sysfs /sys
mount --rbind "$d/cgroup-aside" /sys/fs/cgroup
umount -l "$d/cgroup-aside"
mount --bind "$d/var-lib" /var/lib
mount --bind "$d/var-log" /var/log
mount --bind "$d/run" /run
mkdir -p /run/lock /run/netns
for top in etc opt; do
  mount -t overlay overlay -o "lowerdir=/$top,upperdir=$d/$top/upper,workdir=$d/$top/work" "/$top"
done
for f in "$@"; do
  cp "/proc/sys/$f" "$d/sysctl/${f//\//.}"
  mount --bind "$d/sysctl/${f//\//.}" "/proc/sys/$f"
done
# Shared inside the machine, as systemd makes a node's mounts (pods mount
# /run/netns HostToContainer); the copies are private, so nothing reaches
# the host.
mount --make-rshared /
echo ready >"$d/mounts.ready"
exec sleep infinity
EOF
}

# start_machine NAME IP: network namespace on the underlay, default route via
# the control plane, private mounts.
start_machine() {
  local m=$1 ip=$2 d
  d=$(machine_dir "$m")
  mkdir -p "$d"/{var-lib,var-log,run,sysctl,etc/upper,etc/work,opt/upper,opt/work,logs}
  new_netns "$m"
  underlay_port "$m" "$ip"
  [ "$ip" = "$UNDERLAY_NET.10" ] || in_net "$m" ip route add default via "$UNDERLAY_NET.10"
  machine_mounts_script >"$d/mounts.sh"
  # its own UTS namespace too: host-network pods see the node's hostname
  setsid nsenter --net="$NS_DIR/$m" unshare -m -u --propagation private \
    bash "$d/mounts.sh" "$d" "$m" "${KUBELET_SYSCTLS[@]}" </dev/null >"$d/logs/mounts.log" 2>&1 &
  echo $! >"$d/holder.pid"
  disown # killed by stop_machine; no job notice then
  for _ in $(seq 100); do
    [ -e "$d/mounts.ready" ] && return 0
    kill -0 "$(holder_pid "$m")" 2>/dev/null || break
    sleep 0.05
  done
  cat "$d/logs/mounts.log" >&2
  die "machine $m: mounts failed"
}

# ---------------------------------------------------------------- processes

# Prints the pid of process NAME on machine M if it is alive and ours (its
# environment holds the tag; guards against pid reuse).
proc_pid() {
  local m=$1 name=$2 pid
  pid=$(cat "$(machine_dir "$m")/$name.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  grep -qxF "WEFT_CLUSTER_PROC=$name@$m@$CLUSTER_DIR" < <(tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ") || return 1
  echo "$pid"
}

proc_alive() { proc_pid "$1" "$2" >/dev/null; }

# spawn M NAME CMD...: CMD in machine M, detached, log in logs/NAME.log.
spawn() {
  local m=$1 name=$2 d pid
  shift 2
  d=$(machine_dir "$m")
  rm -f "$d/$name.pid"
  # shellcheck disable=SC2016 # $$ and $@ are for the inner bash
  WEFT_CLUSTER_PROC=$name@$m@$CLUSTER_DIR setsid nsenter -t "$(holder_pid "$m")" -m -n -u -- \
    bash -c 'echo $$ >"$0"; exec "$@"' "$d/$name.pid" "$@" </dev/null >>"$d/logs/$name.log" 2>&1 &
  disown
  for _ in $(seq 100); do
    pid=$(cat "$d/$name.pid" 2>/dev/null || true)
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" != bash ] && return 0
    sleep 0.05
  done
  die "$m: $name did not start (see $d/logs/$name.log)"
}

# stop_proc M NAME: SIGTERM, SIGKILL after 15 s; waits until it is gone.
stop_proc() {
  local m=$1 name=$2 pid
  if pid=$(proc_pid "$m" "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do proc_alive "$m" "$name" || break; sleep 0.1; done
    if proc_alive "$m" "$name"; then
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 50); do proc_alive "$m" "$name" || break; sleep 0.1; done
    fi
  fi
  rm -f "$(machine_dir "$m")/$name.pid"
}

# Every process whose mount namespace is machine M's (containers have their
# own: they are found through their cgroups, remove_cgroup_root).
machine_procs() {
  local m=$1 holder mnt p
  holder=$(holder_pid "$m") || return 0
  mnt=$(readlink "/proc/$holder/ns/mnt" 2>/dev/null) || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$mnt" ] && echo "${p#/proc/}"
  done
  return 0
}

# Cgroup directories (every v1 hierarchy and the unified one) under PATH.
cgroup_dirs() {
  local rel=$1 h
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h$rel" ] && echo "${h%/}/$rel"
  done
  return 0
}

# The cgroup a kubelet gets as its cgroupRoot, created in every v1 hierarchy.
make_cgroup_root() {
  local rel=$1 h
  for h in /sys/fs/cgroup/*/; do
    [ "${h%/}" = /sys/fs/cgroup/unified ] && continue
    mkdir -p "$h$rel"
    if [ -e "${h}cpuset.cpus" ]; then
      cat "${h}cpuset.cpus" >"$h$rel/cpuset.cpus"
      cat "${h}cpuset.mems" >"$h$rel/cpuset.mems"
    fi
  done
}

# Kills every process in the cgroup tree and removes it, deepest first.
remove_cgroup_root() {
  local rel=$1 dir pids
  for _ in 1 2 3; do
    pids=$(cgroup_dirs "$rel" | while read -r dir; do find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null; done | sort -u)
    [ -z "$pids" ] && break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.5
  done
  cgroup_dirs "$rel" | while read -r dir; do
    find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  [ -z "$(cgroup_dirs "$rel")" ] || log "warning: cgroup $rel still present: $(cgroup_dirs "$rel" | paste -sd' ')"
}
