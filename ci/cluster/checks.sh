# shellcheck shell=bash
# `ci/cluster.sh test`: the tutorial's workflow and troubleshooting
# checklist, asserted against the running cluster. Sourced by ci/cluster.sh.
# Every check prints `ok ...` or fails the run with what it saw.

TEST_NS=weft-test
PASSED=0

ok() { PASSED=$((PASSED + 1)); echo "ok   $*"; }
fail() { echo "FAIL $*" >&2; exit 1; }
kc() { kubectl_admin "$@"; }
kt() { kubectl_admin -n "$TEST_NS" "$@"; }

# eventually SECONDS WHAT CMD...: CMD succeeds within SECONDS, or fail.
eventually() {
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "$what (not within $limit s; last try: $("$@" 2>&1 | tail -3))"
    sleep 1
  done
}

# Pod helpers -----------------------------------------------------------

# busybox_pod NAME NODE: a busybox pod pinned to NODE.
busybox_pod() {
  kt apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, labels: {app: busybox}}
spec:
  nodeName: $2
  terminationGracePeriodSeconds: 1
  containers:
  - {name: busybox, image: busybox:1.28, command: [sleep, "86400"]}
EOF
}

# netexec_pod NAME NODE [LABEL=VALUE]: agnhost serving HTTP on 8080 (and UDP).
netexec_pod() {
  local label=${3:-app=netexec}
  kt apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, labels: {${label%%=*}: ${label#*=}}}
spec:
  nodeName: $2
  terminationGracePeriodSeconds: 1
  containers:
  - name: netexec
    image: k8s.gcr.io/e2e-test-images/agnhost:2.21
    args: [netexec, --http-port=8080, --udp-port=8081]
    ports: [{containerPort: 8080}]
    readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 1}
EOF
}

# service NAME SELECTOR(k=v) [TYPE]: port 80 -> 8080.
service() {
  kt apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: $1}
spec:
  type: ${3:-ClusterIP}
  selector: {${2%%=*}: ${2#*=}}
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
EOF
}

wait_pods_ready() {
  kt wait --for=condition=Ready pod --all --timeout=120s >/dev/null ||
    fail "pods not Ready: $(kt get pods -o wide)"
}

pod_ip() { kt get pod "$1" -o jsonpath='{.status.podIP}'; }
pod_node() { kt get pod "$1" -o jsonpath='{.spec.nodeName}'; }
pexec() { local p=$1; shift; kt exec "$p" -- "$@"; }

# bb_http POD IP PORT PATH: the body of an HTTP GET from a busybox pod.
# (Debian's static busybox wget crashes, so the request goes through nc.)
bb_http() {
  local out
  out=$(kt exec "$1" -- sh -c "printf 'GET $4 HTTP/1.0\r\n\r\n' | nc -w 3 $2 $3") || return 1
  case $out in "HTTP/1."*" 200 "*) echo "$out" | tail -1 ;; *) return 1 ;; esac
}

# The node's bridge gateway: the address on its `weft` bridge.
node_gateway() {
  in_machine "$1" ip -4 -o addr show dev weft | awk '{ split($4, a, "/"); print a[1] }'
}

weft_pod_on() {
  kc -n kube-system get pods -l app.kubernetes.io/name=weft --field-selector "spec.nodeName=$1" \
    -o jsonpath='{.items[0].metadata.name}'
}

in_range() { # IP: inside weft's allocation range 10.32.0.0/12
  python3 -c 'import ipaddress,sys; sys.exit(0 if ipaddress.ip_address(sys.argv[1]) in ipaddress.ip_network(sys.argv[2]) else 1)' "$1" "$POD_CIDR"
}

# Checks ----------------------------------------------------------------

check_daemonset() {
  local n=$1 node pod log
  kc -n kube-system get daemonset weft >/dev/null || fail "no DaemonSet kube-system/weft"
  [ "$(kc -n kube-system get daemonset weft -o jsonpath='{.status.numberReady}')" = "$n" ] ||
    fail "DaemonSet weft: numberReady != $n: $(kc -n kube-system get ds weft)"
  ok "DaemonSet weft: $n of $n pods Ready"
  for node in $(nodes); do
    pod=$(weft_pod_on "$node")
    [ -n "$pod" ] || fail "no weft pod on $node"
    [ "$(kc get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] ||
      fail "$node not Ready"
    [ "$(kc get node "$node" -o jsonpath='{.status.conditions[?(@.type=="NetworkUnavailable")].status}')" = False ] ||
      fail "$node: NetworkUnavailable is not False"
    log=$(kc -n kube-system logs "$pod" -c weft)
    [[ $log == *"connection established"* ]] || fail "kubectl logs $pod shows no peer connection"
  done
  ok "every node Ready, NetworkUnavailable=False; every weft pod's log shows its peer connections"
}

check_pods() {
  local node i p ip gw q routes
  kt create namespace "$TEST_NS" >/dev/null 2>&1 || kc create namespace "$TEST_NS" >/dev/null
  for node in $(nodes); do
    for i in 1 2; do busybox_pod "bb-$node-$i" "$node"; done
  done
  wait_pods_ready
  for node in $(nodes); do
    gw=$(node_gateway "$node")
    [ -n "$gw" ] || fail "$node has no address on its weft bridge"
    for i in 1 2; do
      p=bb-$node-$i
      ip=$(pod_ip "$p")
      in_range "$ip" || fail "$p got $ip, outside $POD_CIDR"
      [ "$ip" != "$gw" ] || fail "$p got its node's gateway $gw"
      routes=$(pexec "$p" ip route)
      [[ $routes == *"default via $gw "* ]] || fail "$p: ip route has no 'default via $gw': $routes"
    done
  done
  ok "busybox pods get addresses in $POD_CIDR; 'ip route' shows default via their node's gateway"
  for p in $(kt get pods -l app=busybox -o name | sed 's#pod/##'); do
    for q in $(kt get pods -l app=busybox -o name | sed 's#pod/##'); do
      [ "$p" = "$q" ] && continue
      pexec "$p" ping -c1 -W3 "$(pod_ip "$q")" >/dev/null ||
        fail "ping $q ($(pod_ip "$q"), $(pod_node "$q")) from $p ($(pod_node "$p"))"
    done
  done
  ok "every pod pings every other pod, same node and across nodes, both ways"
}

check_services() {
  local node p svc nodeport nip out
  for node in $(nodes); do netexec_pod "web-$node" "$node" app=web; done
  netexec_pod self node1 app=self
  netexec_pod local-backend node1 app=local
  wait_pods_ready
  service web app=web NodePort
  service self app=self
  service local app=local
  svc=$(kt get svc web -o jsonpath='{.spec.clusterIP}')
  for node in $(nodes); do
    p=bb-$node-1
    eventually 30 "$p reaches Service web ($svc)" bb_http "$p" "$svc" 80 /hostname
  done
  ok "a ClusterIP Service answers from pods on every node"
  svc=$(kt get svc self -o jsonpath='{.spec.clusterIP}')
  eventually 30 "pod self reaches Service self ($svc), whose only backend is itself (hairpin)" \
    pexec self curl -sf --max-time 3 "http://$svc/hostname"
  out=$(pexec self curl -sf --max-time 3 "http://$svc/hostname")
  [ "$out" = self ] || fail "hairpin: Service self answered '$out'"
  ok "hairpin: a pod reaches a Service whose only backend is itself"
  svc=$(kt get svc local -o jsonpath='{.spec.clusterIP}')
  eventually 30 "bb-node1-1 reaches Service local ($svc), backend on its own node" \
    bb_http bb-node1-1 "$svc" 80 /hostname
  ok "a pod reaches a Service whose backend is on its own node (reply through the bridge is un-NATed)"
  nodeport=$(kt get svc web -o jsonpath='{.spec.ports[0].nodePort}')
  for node in $(nodes); do
    nip=$(node_ip "$node")
    eventually 30 "NodePort $nip:$nodeport from the control plane" \
      in_net "$CP" curl -sf --max-time 3 "http://$nip:$nodeport/hostname"
    eventually 30 "NodePort $nip:$nodeport from $node itself" \
      in_machine "$node" curl -sf --max-time 3 "http://$nip:$nodeport/hostname"
  done
  ok "NodePort answers on every node (from outside and from the node)"
}

# check_egress POD: its requests to $OUTSIDE_IP arrive from its node's address.
check_egress() {
  local p=$1 node client
  node=$(pod_node "$p")
  client=$(bb_http "$p" "$OUTSIDE_IP" 80 /clientip) ||
    fail "$p cannot reach $OUTSIDE_IP outside the cluster"
  [ "${client%:*}" = "$(node_ip "$node")" ] ||
    fail "$p reached $OUTSIDE_IP from ${client%:*}, not masqueraded to $node's $(node_ip "$node")"
}

check_egress_all() {
  local node
  for node in $(nodes); do check_egress "bb-$node-1"; done
  ok "pods reach $OUTSIDE_IP outside the cluster, masqueraded to their node's address"
}

# Delete node1's weft pod: the DaemonSet brings it back, pods keep their
# addresses and gateway, egress works, a new pod never gets the gateway.
check_weft_pod_restart() {
  local node=node1 old new gw ip before after p
  old=$(weft_pod_on "$node")
  gw=$(node_gateway "$node")
  before=$(for p in bb-$node-1 bb-$node-2; do pexec "$p" ip -4 -o addr show eth0; done)
  kc -n kube-system delete pod "$old" --wait=true >/dev/null
  eventually 90 "the DaemonSet restarts weft on $node" weft_restarted "$node" "$old"
  new=$(weft_pod_on "$node")
  after=$(for p in bb-$node-1 bb-$node-2; do pexec "$p" ip -4 -o addr show eth0; done)
  [ "$before" = "$after" ] || fail "pod addresses changed across the weft pod restart: $before -> $after"
  [ "$(node_gateway "$node")" = "$gw" ] || fail "$node's gateway moved from $gw to $(node_gateway "$node")"
  pexec "bb-$node-1" ping -c1 -W3 "$gw" >/dev/null || fail "bb-$node-1 no longer reaches its gateway $gw"
  check_egress "bb-$node-1"
  busybox_pod "bb-$node-new" "$node"
  kt wait --for=condition=Ready pod "bb-$node-new" --timeout=60s >/dev/null || fail "new pod on $node not Ready"
  ip=$(pod_ip "bb-$node-new")
  for g in $(for m in $(nodes); do node_gateway "$m"; done); do
    [ "$ip" != "$g" ] || fail "a new pod on $node got the gateway address $g"
  done
  ok "kubectl delete pod $old: $new replaces it; pods keep addresses and gateway $gw, egress works, a new pod got $ip"
}

weft_restarted() {
  local pod
  pod=$(weft_pod_on "$1")
  [ -n "$pod" ] && [ "$pod" != "$2" ] &&
    [ "$(kc -n kube-system get pod "$pod" -o jsonpath='{.status.containerStatuses[0].ready}')" = true ]
}

# The network namespace of POD, as a path inside its node's machine.
pod_netns() {
  local ip
  ip=$(pod_ip "$1")
  # shellcheck disable=SC2016
  in_machine "$(pod_node "$1")" sh -c 'for ns in /run/netns/*; do
    nsenter --net="$ns" ip -4 -o addr show 2>/dev/null | grep -q " $0/" && { echo "$ns"; exit 0; }
  done; exit 1' "$ip"
}

# The longest run of lost echo replies in `ping -i INTERVAL` output, in seconds.
longest_ping_gap() {
  awk -v i="$2" '/icmp_seq=/ { split($0, a, "icmp_seq="); s = a[2] + 0;
      if (seen && s - last - 1 > worst) worst = s - last - 1; last = s; seen = 1 }
    END { printf "%.1f", worst * i }' "$1"
}

# kubectl rollout restart of the DaemonSet while a cross-node ping and a TCP
# stream run between pods: no pod loses its address; reports the longest
# interruption of each.
check_rollout() {
  local a=bb-node1-1 b d stop before after gap result ns_a ns_b node_a node_b
  b=bb-$(nodes | sed -n 2p)-1
  d=$CLUSTER_DIR/rollout
  rm -rf "$d"
  mkdir -p "$d"
  stop=$d/stop
  pkill -f "$ROOT/ci/cluster/stream.py" || true # an earlier, interrupted run
  ns_a=$(pod_netns "$a") && ns_b=$(pod_netns "$b") || fail "network namespaces of $a and $b not found"
  node_a=$(pod_node "$a")
  node_b=$(pod_node "$b")
  before=$(kt get pods -o jsonpath='{range .items[*]}{.metadata.name}={.status.podIP} {end}')
  # The baseline: the earlier checks restart agents, so the path between
  # the two pods must work before the interruption is measured.
  local since=$SECONDS
  eventually 30 "$a reaches $b before the rollout" pexec "$a" ping -c1 -W1 "$(pod_ip "$b")"
  log "$a reaches $b ($((SECONDS - since)) s after the check began)"
  in_machine "$node_b" nsenter --net="$ns_b" python3 "$ROOT/ci/cluster/stream.py" server 0.0.0.0 9400 "$stop" \
    >"$d/stream.json" 2>&1 &
  local server=$!
  eventually 10 "stream server listening in $b" in_machine "$node_b" nsenter --net="$ns_b" sh -c 'ss -ltn | grep -q ":9400 "'
  in_machine "$node_a" nsenter --net="$ns_a" python3 "$ROOT/ci/cluster/stream.py" client "$(pod_ip "$b")" 9400 "$stop" \
    2>"$d/client.err" &
  local client=$!
  in_machine "$node_a" nsenter --net="$ns_a" ping -D -i 0.1 "$(pod_ip "$b")" >"$d/ping.log" 2>&1 &
  local ping=$!
  sleep 3
  kc -n kube-system rollout restart daemonset/weft >/dev/null
  kc -n kube-system rollout status daemonset/weft --timeout=300s >/dev/null || fail "rollout did not finish"
  sleep 3
  touch "$stop"
  in_machine "$node_a" pkill -INT -f "ping -D -i 0.1 $(pod_ip "$b")" || true
  wait "$client" || fail "the TCP stream's client failed: $(cat "$d/client.err")"
  wait "$server" || true
  wait "$ping" 2>/dev/null || true
  result=$(cat "$d/stream.json")
  case $result in *'"ended_by": "stop"'*) ;; *) fail "the TCP stream did not survive the rollout: $result" ;; esac
  after=$(kt get pods -o jsonpath='{range .items[*]}{.metadata.name}={.status.podIP} {end}')
  [ "$before" = "$after" ] || fail "pod addresses changed during the rollout: $before -> $after"
  for p in $a $b; do
    [[ $(pexec "$p" ip -4 -o addr show eth0) == *" $(pod_ip "$p")/"* ]] || fail "$p lost its address"
  done
  gap=$(longest_ping_gap "$d/ping.log" 0.1)
  if awk -v g="$gap" 'BEGIN { exit !(g > 2) }'; then
    log "the ping stopped for $gap s: what the agents saw and the routes now, for the diagnosis"
    rollout_evidence >&2
  fi
  ok "rollout restart of the DaemonSet: no pod lost its address; longest interruption: ping ${gap} s, TCP stream $(echo "$result" | sed 's/.*"max_gap_s": \([0-9.]*\).*/\1/') s (connection kept, $result)"
}

rollout_evidence() {
  local pod node
  for pod in $(kc -n kube-system get pods -l app.kubernetes.io/name=weft -o name); do
    echo "----- kubectl logs $pod"
    kc -n kube-system logs "$pod" -c weft | grep -v 'ipam: Allocated' | tail -n 25
  done
  for node in $(nodes); do
    echo "----- $node: ip route; ip neigh show dev weft-vxlan"
    in_machine "$node" sh -c 'ip route; ip neigh show dev weft-vxlan'
  done
}

# The last node is removed (Node deleted, kubelet stopped): its address
# space is reclaimed exactly once; a new node joins and gets space and
# connectivity.
check_node_removal() {
  local gone new reclaims pod
  gone=$(nodes | tail -1)
  new=node$(( ${gone#node} + 1 ))
  kc delete node "$gone" --wait=true >/dev/null
  stop_machine "$gone"
  rm -rf "$(machine_dir "$gone")"
  eventually 120 "one reclaim of $gone's space" reclaim_count_is 1
  sleep 5
  reclaims=$(reclaim_count)
  [ "$reclaims" = 1 ] || fail "$gone's space was reclaimed $reclaims times"
  ok "$gone removed (kubectl delete node, kubelet stopped): its address space was reclaimed exactly once"
  start_node "$new"
  eventually 180 "$new Ready with weft" weft_pods_ready "$(nodes | wc -l)"
  busybox_pod "bb-$new-1" "$new"
  kt wait --for=condition=Ready pod "bb-$new-1" --timeout=120s >/dev/null || fail "pod on $new not Ready"
  in_range "$(pod_ip "bb-$new-1")" || fail "bb-$new-1 got $(pod_ip "bb-$new-1")"
  eventually 30 "bb-$new-1 pings bb-node1-1" pexec "bb-$new-1" ping -c1 -W2 "$(pod_ip bb-node1-1)"
  eventually 30 "bb-node1-1 pings bb-$new-1" pexec bb-node1-1 ping -c1 -W2 "$(pod_ip "bb-$new-1")"
  pod=$(weft_pod_on "$new")
  ok "$new joined: $pod Ready, bb-$new-1 got $(pod_ip "bb-$new-1") and reaches node1's pods both ways"
}

reclaim_count() {
  local pod n=0
  for pod in $(kc -n kube-system get pods -l app.kubernetes.io/name=weft -o name); do
    n=$((n + $(kc -n kube-system logs "$pod" -c weft | grep -c "reclaimed a removed Node's address space" || true)))
  done
  echo "$n"
}
reclaim_count_is() { [ "$(reclaim_count)" = "$1" ]; }

doctor() { # NODE ARGS...: weft doctor in that node's weft pod
  local node=$1
  shift
  kc -n kube-system exec "$(weft_pod_on "$node")" -c weft -- /weft doctor "$@"
}

check_doctor() {
  local node out cut victim
  for node in $(nodes); do
    out=$(doctor "$node" --pods --cluster 2>&1) || fail "weft doctor --pods --cluster on $node: $out"
    [ -z "$(echo "$out" | grep -v '^ok ')" ] || fail "weft doctor on $node is not all ok: $out"
  done
  ok "weft doctor --pods --cluster (kubectl exec into the weft pod) is all ok on every node"
  victim=$(nodes | sed -n 2p)
  cut="ul-$(node_ip "$victim" | cut -d. -f4)"
  in_net "$UNDERLAY" ip link set "$cut" down
  eventually 60 "weft doctor on node1 names $victim unreachable, with the cause" doctor_names node1 "$victim"
  out=$(doctor node1 --cluster 2>&1 || true)
  in_net "$UNDERLAY" ip link set "$cut" up
  echo "$out" | grep -v '^ok ' | sed 's/^/     /'
  ok "with $victim's underlay link cut, weft doctor on node1 names the cause"
  eventually 60 "doctor all ok again after the link is back" doctor node1 --cluster
}

# A real Prometheus (Debian's) on the control plane scrapes every weft pod
# on its node's metrics port (as deploy/weft.yaml sets it) with
# deploy/monitoring's rules; with one node's underlay link cut,
# WeftPeerUnreachable fires on node1 and clears once the link is back. The
# rules' `for` is shortened to 5 s so the check takes seconds, not minutes.
check_monitoring() {
  local dir node targets victim cut
  command -v prometheus >/dev/null || {
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
  }
  dir=$CLUSTER_DIR/prometheus
  rm -rf "$dir" && mkdir -p "$dir"
  targets=$(for node in $(nodes); do printf '"%s:6782",' "$(node_ip "$node")"; done)
  sed 's/^\( *for: \).*/\15s/' "$ROOT/deploy/monitoring/weft.rules.yaml" >"$dir/weft.rules.yaml"
  printf '%s\n' \
    'global: {scrape_interval: 2s, evaluation_interval: 2s}' \
    'rule_files: [weft.rules.yaml]' \
    'scrape_configs:' \
    "  - {job_name: weft, static_configs: [{targets: [${targets%,}]}]}" >"$dir/prometheus.yml"
  in_machine "$CP" prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --web.listen-address=127.0.0.1:9090 >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
  within 60 prometheus_targets_up "$(nodes | wc -l)" ||
    stop_prometheus fail "Prometheus does not scrape every weft agent: $(prometheus_get /api/v1/targets)"
  ok "Prometheus on the control plane scrapes every weft agent on its node's port 6782"
  victim=$(nodes | tail -1)
  cut="ul-$(node_ip "$victim" | cut -d. -f4)"
  in_net "$UNDERLAY" ip link set "$cut" down
  if ! within 90 prometheus_alert_on node1; then
    in_net "$UNDERLAY" ip link set "$cut" up
    stop_prometheus fail "WeftPeerUnreachable did not fire on node1 with $victim cut off: $(prometheus_get /api/v1/alerts)"
  fi
  in_net "$UNDERLAY" ip link set "$cut" up
  ok "with $victim's underlay link cut, WeftPeerUnreachable fires on node1"
  within 90 prometheus_alert_clear node1 ||
    stop_prometheus fail "WeftPeerUnreachable still firing after $victim's link is back: $(prometheus_get /api/v1/alerts)"
  stop_prometheus
  ok "WeftPeerUnreachable clears once $victim's link is back"
}

# stop_prometheus [CMD...]: stops check_monitoring's Prometheus, then runs CMD.
stop_prometheus() {
  kill "$(cat "$CLUSTER_DIR/prometheus/pid")" 2>/dev/null || true
  "$@"
}

# within SECONDS CMD...: CMD succeeds within SECONDS (status 1 if not).
within() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 1
  done
}

# GET PATH from check_monitoring's Prometheus: its JSON answer.
prometheus_get() {
  in_machine "$CP" python3 -c 'import sys, urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9090" + sys.argv[1], timeout=2).read().decode())' "$1"
}

prometheus_targets_up() { # N: N targets, all up
  prometheus_get /api/v1/targets | python3 -c 'import json, sys
t = json.load(sys.stdin)["data"]["activeTargets"]
sys.exit(0 if len(t) == int(sys.argv[1]) and all(x["health"] == "up" for x in t) else 1)' "$1"
}

# NODE: whether WeftPeerUnreachable fires for NODE's agent.
prometheus_firing() {
  prometheus_get /api/v1/alerts | python3 -c 'import json, sys
a = json.load(sys.stdin)["data"]["alerts"]
print(any(x["labels"]["alertname"] == "WeftPeerUnreachable" and x["state"] == "firing"
          and x["labels"]["instance"] == sys.argv[1] + ":6782" for x in a))' "$(node_ip "$1")"
}
prometheus_alert_on() { [ "$(prometheus_firing "$1")" = True ]; }
prometheus_alert_clear() { [ "$(prometheus_firing "$1")" = False ]; }

# The doctor on NODE fails the peer on VICTIM and says why: no answer on
# weft's UDP ports from there.
doctor_names() {
  local out
  out=$(doctor "$1" --cluster 2>&1 | grep '^FAIL  peer ')
  [[ $out == *"$2"* && $out == *"gets no answer"* ]]
}

# kubectl apply a second time changes nothing; uninstalling (kubectl delete
# -f, then `weft reset` on each node) leaves nothing of weft on the nodes.
check_reapply_and_uninstall() {
  local out gen node left
  gen=$(kc -n kube-system get ds weft -o jsonpath='{.metadata.generation}')
  out=$(kc apply -f - <"$ROOT/deploy/weft.yaml" 2>&1)
  [ -z "$(echo "$out" | grep -v ' unchanged$')" ] || fail "a second kubectl apply changed something: $out"
  [ "$(kc -n kube-system get ds weft -o jsonpath='{.metadata.generation}')" = "$gen" ] || fail "DaemonSet generation changed"
  ok "a second kubectl apply -f deploy/weft.yaml: every object unchanged"
  kt delete pods --all --grace-period=1 --wait=true >/dev/null
  kc delete -f - <"$ROOT/deploy/weft.yaml" --wait=true >/dev/null
  eventually 60 "weft pods gone" no_weft_pods
  for node in $(nodes); do
    uninstall_node "$node"
    left=$(weft_leftovers "$node")
    [ -z "$left" ] || fail "after uninstall $node still has: $left"
  done
  ok "kubectl delete -f deploy/weft.yaml + weft reset: no weft device, route, nftables table, CNI file or process on any node"
  apply_weft >/dev/null
  wait_ready "$(nodes | wc -l)"
  ok "reinstalled: every node Ready again"
}

no_weft_pods() {
  [ -z "$(kc -n kube-system get pods -l app.kubernetes.io/name=weft -o name)" ]
}

# The README's uninstall step on one node: `weft reset` from the image.
uninstall_node() {
  # its own cgroup inside the node's, removed with it
  in_machine "$1" ctr -a /run/containerd/containerd.sock -n k8s.io run --rm --net-host --privileged \
    --cgroup "/$CGROUP_PREFIX-$1/weft-reset" \
    --mount type=bind,src=/etc/cni/net.d,dst=/etc/cni/net.d,options=rbind:rw \
    --mount type=bind,src=/opt/cni/bin,dst=/opt/cni/bin,options=rbind:rw \
    --mount type=bind,src=/var/lib/weft,dst=/var/lib/weft,options=rbind:rw \
    ghcr.io/weft-net/weft:latest weft-reset /weft reset >/dev/null
}

weft_leftovers() {
  local node=$1
  in_machine "$node" sh -c '
    ip -o link show | grep -E ": (weft|vethwe|vxlan-weft|weft-)" | cut -d: -f2
    ip route | grep -E "10\.32\.|dev weft" 
    nft list tables 2>/dev/null | grep weft
    ls /etc/cni/net.d /opt/cni/bin 2>/dev/null | grep weft
    pgrep -a -x weft' || true
}

# run_tests [CHECK...]: all checks in order, or the named ones (for
# debugging: `test rollout doctor` runs check_rollout and check_doctor
# against pods an earlier full run left).
run_tests() {
  local n t c
  t=$(now)
  if [ $# -gt 0 ]; then
    for c in "$@"; do "check_$c" "$(nodes | wc -l)"; done
    echo "passed: $PASSED checks in $(since "$t") s"
    return 0
  fi
  n=$(nodes | wc -l)
  [ "$n" -ge 2 ] || die "test needs at least 2 nodes (bash ci/cluster.sh up 3)"
  kc delete namespace "$TEST_NS" --wait=true >/dev/null 2>&1 || true
  check_daemonset "$n"
  check_pods
  check_services
  check_egress_all
  check_weft_pod_restart
  check_rollout
  check_doctor
  check_monitoring
  check_node_removal
  check_reapply_and_uninstall
  kc delete namespace "$TEST_NS" --wait=false >/dev/null
  echo "passed: $PASSED checks in $(since "$t") s"
}
