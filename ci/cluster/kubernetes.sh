# shellcheck shell=bash
# The Kubernetes processes of the one-machine cluster: credentials, the
# control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) on machine `control-plane`, and per node containerd,
# kubelet and kube-proxy. Sourced by ci/cluster.sh; uses machines.sh.

CP=control-plane
CP_IP=$UNDERLAY_NET.10
API=https://$CP_IP:6443
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1
CLUSTER_DNS=10.96.0.10
POD_CIDR=10.32.0.0/12 # weft's default IPALLOC_RANGE
MAX_NODES=9
PKI=$CLUSTER_DIR/pki

kbin() { echo "$KUBE_CACHE/bin/$1"; }
node_ip() { echo "$UNDERLAY_NET.$((10 + ${1#node}))"; }

# ---------------------------------------------------------------- credentials

cert() { # NAME SUBJECT [SAN]: a certificate signed by the cluster CA
  local name=$1 subj=$2 san=${3:-}
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  if [ -n "$san" ]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" >"$PKI/$name.ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' >"$PKI/$name.ext"
  fi
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 30 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

# kubeconfig FILE USER TOKEN
kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: weft
  cluster:
    server: $API
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    token: $3
contexts:
- name: $2@weft
  context: {cluster: weft, user: $2}
current-context: $2@weft
EOF
}

# Tokens (static token file) for every client; one per possible node, since
# the file is read once and nodes may join later.
make_credentials() {
  local i user group tok
  mkdir -p "$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
    -days 30 -subj /CN=weft-cluster-ca 2>/dev/null
  cert apiserver /CN=kube-apiserver \
    "IP:$CP_IP,IP:$SERVICE_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  : >"$PKI/tokens.csv"
  while read -r name user group; do
    tok=$(openssl rand -hex 16)
    echo "$tok,$user,$user,\"$group\"" >>"$PKI/tokens.csv"
    kubeconfig "$CLUSTER_DIR/$name.kubeconfig" "$user" "$tok"
  done < <(
    echo "admin admin system:masters"
    echo "controller-manager system:kube-controller-manager system:authenticated"
    echo "scheduler system:kube-scheduler system:authenticated"
    echo "kube-proxy system:kube-proxy system:authenticated"
    for i in $(seq "$MAX_NODES"); do echo "node$i system:node:node$i system:nodes"; done
  )
}

# ---------------------------------------------------------------- control plane

wait_for() { # SECONDS WHAT CMD...: until CMD succeeds
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what: not after $limit s"
    sleep 0.2
  done
}

# The world outside the cluster: $OUTSIDE_IP on the control plane, an HTTP
# server there that answers with the client's address (/clientip), and
# google.com naming it in the control plane's /etc/hosts, for the e2e
# suite's "can we talk to the internet" pre-check (nothing else is online).
start_outside() {
  in_net "$CP" ip addr add "$OUTSIDE_IP/32" dev lo
  in_machine "$CP" sh -c "echo '$OUTSIDE_IP google.com www.google.com' >>/etc/hosts"
  spawn "$CP" outside-web "$(kbin agnhost)" netexec --http-port=80 --udp-port=8081
  wait_for 10 "the server outside the cluster" in_net "$CP" curl -sf "http://$OUTSIDE_IP/healthz"
}

start_control_plane() {
  start_outside
  spawn "$CP" etcd etcd --name weft --data-dir /var/lib/etcd \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster weft=http://127.0.0.1:2380 --unsafe-no-fsync
  wait_for 20 "etcd healthy" in_net "$CP" curl -sf --max-time 2 http://127.0.0.1:2379/health
  spawn "$CP" kube-apiserver "$(kbin kube-apiserver)" --etcd-servers=http://127.0.0.1:2379 \
    --advertise-address="$CP_IP" --bind-address=0.0.0.0 --secure-port=6443 \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" --token-auth-file="$PKI/tokens.csv" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction --allow-privileged=true
  wait_for 90 "kube-apiserver ready" kubectl_admin get --raw /readyz
  spawn "$CP" kube-controller-manager "$(kbin kube-controller-manager)" \
    --kubeconfig="$CLUSTER_DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$CLUSTER_DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$CLUSTER_DIR/controller-manager.kubeconfig" \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false \
    --bind-address=127.0.0.1 --port=0 --cert-dir=/var/lib/kube-controller-manager \
    --service-cluster-ip-range="$SERVICE_CIDR"
  spawn "$CP" kube-scheduler "$(kbin kube-scheduler)" \
    --kubeconfig="$CLUSTER_DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig="$CLUSTER_DIR/scheduler.kubeconfig" \
    --authorization-kubeconfig="$CLUSTER_DIR/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --port=0 --cert-dir=/var/lib/kube-scheduler
  start_dns
}

# Cluster DNS (CoreDNS is not packaged in Debian): ci/cluster/dns.py on the
# control plane answers for cluster.local from the API's Services,
# Endpoints and Pods, behind the Service kube-system/kube-dns at
# $CLUSTER_DNS (selector-less, with its Endpoints pointing there).
start_dns() {
  spawn "$CP" cluster-dns python3 "$ROOT/ci/cluster/dns.py" --listen "$CP_IP" --port 53 \
    --source "$(kbin kubectl) --kubeconfig $CLUSTER_DIR/admin.kubeconfig get services,endpoints,pods -A -o json"
  kubectl_admin apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $CLUSTER_DNS
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
subsets:
- addresses: [{ip: $CP_IP}]
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
EOF
}

# kubectl as admin, from the control plane's network namespace (the API
# server's address lives only on the underlay).
kubectl_admin() {
  in_net "$CP" "$(kbin kubectl)" --kubeconfig "$CLUSTER_DIR/admin.kubeconfig" "$@"
}

# ---------------------------------------------------------------- nodes

containerd_config() {
  cat <<EOF
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "k8s.gcr.io/pause:3.2"
  # root here lacks CAP_SYS_RESOURCE: runc may not lower oom_score_adj
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
EOF
}

kubelet_config() {
  local node=$1
  cat <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(node_ip "$node")
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_PREFIX-$node
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
protectKernelDefaults: false
clusterDNS: [$CLUSTER_DNS]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
}

kube_proxy_config() {
  local node=$1
  cat <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
bindAddress: $(node_ip "$node")
clusterCIDR: $POD_CIDR
hostnameOverride: $node
clientConnection:
  kubeconfig: $CLUSTER_DIR/kube-proxy.kubeconfig
# kube-proxy may not raise the host's conntrack limits or timeouts
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
}

# What a node's provisioning installs beside the runtime (kubeadm's
# kubernetes-cni package): the reference plugins weft's conflist chains
# (portmap) and that containerd calls for the pod's lo (loopback). weft's
# own plugin and conflist come from its DaemonSet.
install_node_cni_plugins() {
  local node=$1 p
  in_machine "$node" mkdir -p /opt/cni/bin
  for p in loopback portmap bridge host-local; do
    in_machine "$node" install -m 0755 "/usr/lib/cni/$p" "/opt/cni/bin/$p"
  done
}

start_node() {
  local node=$1 d ip
  d=$(machine_dir "$node")
  ip=$(node_ip "$node")
  start_machine "$node" "$ip"
  make_cgroup_root "$CGROUP_PREFIX-$node"
  install_node_cni_plugins "$node"
  containerd_config >"$d/containerd.toml"
  kubelet_config "$node" >"$d/kubelet.yaml"
  kube_proxy_config "$node" >"$d/kube-proxy.yaml"
  spawn "$node" containerd containerd --config "$d/containerd.toml"
  wait_for 30 "$node: containerd" in_machine "$node" ctr -a /run/containerd/containerd.sock version
  images_import "$d/run/containerd/containerd.sock"
  spawn "$node" kubelet "$(kbin kubelet)" --config="$d/kubelet.yaml" \
    --kubeconfig="$CLUSTER_DIR/$node.kubeconfig" --hostname-override="$node" --node-ip="$ip" \
    --container-runtime=remote --container-runtime-endpoint=unix:///run/containerd/containerd.sock \
    --root-dir=/var/lib/kubelet --cert-dir=/var/lib/kubelet/pki \
    --volume-plugin-dir=/var/lib/kubelet/volume-plugins
  spawn "$node" kube-proxy "$(kbin kube-proxy)" --config="$d/kube-proxy.yaml"
}

# Stops a node's processes, its containers (by cgroup), and its namespaces.
stop_machine() {
  local m=$1 d name pids ns
  d=$(machine_dir "$m")
  [ -d "$d" ] || return 0
  for name in kubelet kube-proxy outside-web cluster-dns kube-scheduler kube-controller-manager kube-apiserver containerd etcd; do
    stop_proc "$m" "$name"
  done
  remove_cgroup_root "$CGROUP_PREFIX-$m"
  pids=$(machine_procs "$m")
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  for _ in $(seq 50); do
    [ -z "$(machine_procs "$m")" ] && break
    sleep 0.1
  done
  # the holder itself (its mount namespace ends with it)
  kill -KILL "$(holder_pid "$m")" 2>/dev/null || true
  rm -f "$d/holder.pid" "$d/mounts.ready"
  ns=$NS_DIR/$m
  if [ -e "$ns" ]; then
    umount "$ns" 2>/dev/null || true
    rm -f "$ns"
  fi
}
