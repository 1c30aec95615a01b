#!/usr/bin/env python3
"""Cluster DNS for the test cluster of ci/cluster.sh: a small authoritative
server for cluster.local following the Kubernetes DNS specification
(https://github.com/kubernetes/dns/blob/master/docs/specification.md),
because CoreDNS is not packaged in Debian and the cluster is built offline.

  dns.py --listen ADDR [--port 53] (--source CMD | --source-file FILE)
         [--refresh 1.0] [--verbose]
  dns.py --self-test

CMD prints `kubectl get services,endpoints,pods -A -o json`; it is re-run
every --refresh seconds and each good result replaces the whole record table
(a failed run keeps the previous one). Until the first good run every query
gets SERVFAIL, so clients retry instead of caching a negative answer.

Answers (UDP and TCP, TTL 5, authoritative):
  <svc>.<ns>.svc.cluster.local        A/AAAA ClusterIP; ready endpoints if
                                      headless; CNAME if ExternalName
  <host>.<svc>.<ns>.svc.cluster.local A of the endpoint; <host> is the
                                      endpoint hostname or its dashed IP
  _<port>._<proto>.<svc>.<ns>.svc...  SRV for named ports (per endpoint if
                                      headless), targets' A in additional
  <a-b-c-d>.<ns>.pod.cluster.local    A of a pod
  <reversed-ip>.in-addr.arpa          PTR of ClusterIPs, endpoints, pods
  dns-version.cluster.local           TXT "1.1.0"
An existing name without the asked type gets NODATA, a missing one NXDOMAIN,
both with the zone's SOA. Names outside our zones get NXDOMAIN too (without
AA or SOA): the cluster is offline, and NXDOMAIN lets glibc and musl move on
through the search list at once, where SERVFAIL makes them retry and REFUSED
makes musl give up the whole lookup. A UDP answer larger than 512 bytes, or
than the client's EDNS0 size, loses its glue first, then is cut to the
records that fit and flagged TC (the client retries over TCP).
"""
import argparse
import ipaddress
import json
import os
import random
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple, Optional

DOMAIN = "cluster.local"
ZONES = (DOMAIN, "in-addr.arpa", "ip6.arpa")
TTL = 5
A, CNAME, SOA, PTR, TXT, AAAA, SRV, OPT, ANY = 1, 5, 6, 12, 16, 28, 33, 41, 255
TYPE_NAMES = {A: "A", CNAME: "CNAME", SOA: "SOA", PTR: "PTR", TXT: "TXT",
              AAAA: "AAAA", SRV: "SRV", OPT: "OPT", ANY: "ANY"}
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16
IN = 1
EDNS_PAYLOAD = 1232  # the size we advertise: fits any path without fragments


def log(msg):
    print(f"dns.py: {msg}", file=sys.stderr, flush=True)


class FormErr(Exception):
    """The packet is not a well-formed DNS query."""


# ---------------------------------------------------------------- wire format

def encode_name(name):
    """Uncompressed wire form of a dotted name; ValueError if it cannot be one."""
    out = b""
    for label in filter(None, name.strip(".").split(".")):
        raw = label.encode("ascii")
        if len(raw) > 63:
            raise ValueError(f"label too long in {name!r}")
        out += bytes([len(raw)]) + raw
    if len(out) >= 255:
        raise ValueError(f"name too long: {name!r}")
    return out + b"\0"


def read_name(msg, off):
    """The labels of the name at off, following compression pointers, and the
    offset just after it."""
    labels, end, length = [], None, 0
    while True:
        if off >= len(msg):
            raise FormErr("name runs past the end")
        n = msg[off]
        if n >= 0xC0:
            if off + 1 >= len(msg):
                raise FormErr("cut compression pointer")
            target = (n & 0x3F) << 8 | msg[off + 1]
            # Only backward pointers are accepted: that alone rules out loops.
            if target >= off:
                raise FormErr("forward compression pointer")
            end = off + 2 if end is None else end
            off = target
            continue
        if n > 63:
            raise FormErr("unknown label type")
        off += 1
        if n == 0:
            return labels, off if end is None else end
        if off + n > len(msg):
            raise FormErr("label runs past the end")
        length += n + 1
        if length > 254:
            raise FormErr("name too long")
        labels.append(msg[off:off + n])
        off += n


def rr(owner_wire, rtype, rdata, ttl=TTL, rclass=IN):
    return owner_wire + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


class Query(NamedTuple):
    qid: int
    opcode: int
    rd: bool
    labels: list
    qtype: int
    qclass: int
    edns: Optional[tuple]  # (udp payload size, version) when an OPT came along

    @property
    def key(self):
        """The name as a table key: ASCII-lowercased, or None when a label
        holds a dot (such a name cannot be ours, and joining would lie)."""
        if any(b"." in label for label in self.labels):
            return None
        return b".".join(self.labels).lower().decode("latin-1")


def parse_query(msg):
    qid, flags, qd, an, ns, ar = struct.unpack_from("!6H", msg)
    if qd != 1:
        raise FormErr(f"{qd} questions")
    labels, off = read_name(msg, 12)
    if off + 4 > len(msg):
        raise FormErr("cut question")
    qtype, qclass = struct.unpack_from("!HH", msg, off)
    off += 4
    edns = None
    for i in range(an + ns + ar):
        name, off = read_name(msg, off)
        if off + 10 > len(msg):
            raise FormErr("cut record")
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
        off += 10 + rdlen
        if off > len(msg):
            raise FormErr("cut rdata")
        if rtype == OPT:
            if edns is not None or name or i < an + ns:
                raise FormErr("misplaced OPT")
            edns = (rclass, ttl >> 16 & 0xFF)
    return Query(qid, flags >> 11 & 0xF, bool(flags & 0x0100), labels, qtype, qclass, edns)


# ---------------------------------------------------------------- records

class Record(NamedTuple):
    rtype: int
    rdata: bytes
    target: str = ""  # the name inside rdata (CNAME, SRV, PTR), for chasing and glue


def zone_of(name):
    for zone in ZONES:
        if name == zone or name.endswith("." + zone):
            return zone
    return None


def dashed(ip):
    return str(ip).replace(".", "-").replace(":", "-")


class Table:
    """One snapshot of every record. Built whole, then only read: queries run
    on other threads while the next snapshot is being built."""

    def __init__(self):
        self.records = {}  # name -> [Record]
        self.names = set()  # every existing name, empty non-terminals included
        self.skipped = []  # why items were left out, for the log

    def touch(self, name):
        labels = name.lower().split(".")
        self.names.update(".".join(labels[i:]) for i in range(len(labels)))

    def add(self, name, rtype, rdata, target=""):
        name = name.lower()
        recs = self.records.setdefault(name, [])
        if Record(rtype, rdata, target) not in recs:
            recs.append(Record(rtype, rdata, target))
        self.touch(name)

    def add_address(self, name, ip):
        self.add(name, A if ip.version == 4 else AAAA, ip.packed)

    def add_pointer(self, name, target):
        self.add(name, PTR, encode_name(target), target.lower())

    def add_srv(self, name, port, target):
        self.add(name, SRV, struct.pack("!HHH", 0, 100, port) + encode_name(target), target.lower())


def ready_endpoints(subsets):
    """(ip, host label, {(port name, protocol): port}) of each ready address;
    notReadyAddresses are left out as the specification asks."""
    for subset in subsets or []:
        ports = {(p.get("name", ""), p.get("protocol", "TCP")): p["port"]
                 for p in subset.get("ports") or []}
        for address in subset.get("addresses") or []:
            ip = ipaddress.ip_address(address["ip"])
            yield ip, address.get("hostname") or dashed(ip), ports


def add_service(t, svc, subsets):
    meta, spec = svc["metadata"], svc.get("spec") or {}
    base = f"{meta['name']}.{meta['namespace']}.svc.{DOMAIN}"
    t.touch(base)
    if spec.get("type") == "ExternalName":
        t.add(base, CNAME, encode_name(spec["externalName"]), spec["externalName"].strip(".").lower())
        return
    headless = spec.get("clusterIP") == "None"
    endpoints = list(ready_endpoints(subsets))
    if headless:
        for ip, _, _ in endpoints:
            t.add_address(base, ip)
    else:
        for ip in map(ipaddress.ip_address, spec.get("clusterIPs") or [spec["clusterIP"]]):
            t.add_address(base, ip)
            t.add_pointer(ip.reverse_pointer, base)
    for ip, host, _ in endpoints:
        t.add_address(f"{host}.{base}", ip)
        t.add_pointer(ip.reverse_pointer, f"{host}.{base}")
    for port in spec.get("ports") or []:
        if not port.get("name"):
            continue  # the specification gives SRV records to named ports only
        proto = port.get("protocol", "TCP")
        srv = f"_{port['name']}._{proto.lower()}.{base}"
        t.touch(srv)
        if not headless:
            t.add_srv(srv, port["port"], base)
            continue
        for _, host, ports in endpoints:
            if (port["name"], proto) in ports:
                t.add_srv(srv, ports[(port["name"], proto)], f"{host}.{base}")


def add_pod(t, pod):
    status = pod.get("status") or {}
    ips = [p["ip"] for p in status.get("podIPs") or []] or [status["podIP"]]
    for ip in map(ipaddress.ip_address, ips):
        name = f"{dashed(ip)}.{pod['metadata']['namespace']}.pod.{DOMAIN}"
        t.add_address(name, ip)
        # Services named an endpoint already; host-network pods share the
        # node's address, so the first pod alone gets it.
        if ip.reverse_pointer not in t.records:
            t.add_pointer(ip.reverse_pointer, name)


def build_table(doc):
    t = Table()
    items = [i for i in doc.get("items") or [] if isinstance(i, dict)]
    subsets = {(i["metadata"]["namespace"], i["metadata"]["name"]): i.get("subsets")
               for i in items if i.get("kind") == "Endpoints" and "metadata" in i}
    # Services first so that pods only fill in PTRs nobody else gave.
    for item in sorted(items, key=lambda i: i.get("kind") != "Service"):
        try:
            if item.get("kind") == "Service":
                meta = item["metadata"]
                add_service(t, item, subsets.get((meta["namespace"], meta["name"])))
            elif item.get("kind") == "Pod" and (item.get("status") or {}).get("podIP"):
                add_pod(t, item)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            t.skipped.append(f"{item.get('kind')} {(item.get('metadata') or {}).get('name')}: {e!r}")
    serial = int(time.time()) & 0xFFFFFFFF
    for zone in ZONES:
        t.add(zone, SOA, encode_name(f"ns.dns.{DOMAIN}") + encode_name(f"hostmaster.{DOMAIN}")
              + struct.pack("!5I", serial, 7200, 1800, 86400, TTL))
    t.add(f"dns-version.{DOMAIN}", TXT, b"\x051.1.0")
    return t


def resolve(t, key, qtype):
    """(rcode, answers, authority, additional, authoritative); each section a
    list of (owner name, Record)."""
    zone = zone_of(key) if key else None
    if zone is None:
        return NXDOMAIN, [], [], [], False
    answers, owner = [], key
    for _ in range(8):  # a bounded CNAME chase, in case ExternalNames loop
        recs = t.records.get(owner, [])
        cname = next((r for r in recs if r.rtype == CNAME), None)
        if cname and qtype not in (CNAME, ANY):
            answers.append((owner, cname))
            owner = cname.target
            continue
        answers += [(owner, r) for r in recs if qtype in (r.rtype, ANY)]
        break
    if answers:
        glue = [(r.target, g) for _, r in answers if r.rtype == SRV
                for g in t.records.get(r.target, []) if g.rtype in (A, AAAA)]
        return NOERROR, answers, [], glue, True
    soa = [(zone, r) for r in t.records.get(zone, []) if r.rtype == SOA]
    return NOERROR if key in t.names else NXDOMAIN, [], soa, [], True


# ---------------------------------------------------------------- replies

def header(qid, opcode, rd, rcode, counts, aa=False, tc=False):
    flags = 0x8000 | opcode << 11 | aa << 10 | tc << 9 | rd << 8 | (rcode & 0xF)
    return struct.pack("!6H", qid, flags, *counts)


def build_reply(q, rcode, sections, aa, limit):
    question = b"".join(bytes([len(x)]) + x for x in q.labels) + b"\0" + struct.pack("!HH", q.qtype, q.qclass)
    opt = [rr(b"\0", OPT, b"", ttl=(rcode >> 4) << 24, rclass=EDNS_PAYLOAD)] if q.edns else []

    def wire(owner):  # the question's name is at offset 12: point there
        return b"\xc0\x0c" if owner == q.key else encode_name(owner)

    answers, authority, additional = ([rr(wire(o), r.rtype, r.rdata) for o, r in s] for s in sections)
    # Glue is optional, so it goes first; only then does the client get TC.
    for extra in (additional, []):
        body = answers + authority + extra + opt
        msg = header(q.qid, q.opcode, q.rd, rcode, (1, len(answers), len(authority), len(extra) + len(opt)),
                     aa) + question + b"".join(body)
        if len(msg) <= limit:
            return msg
    # Still too big: as many answers as fit, flagged TC, as CoreDNS does, so
    # resolvers that never retry over TCP (musl before 1.2.4) get some.
    fit, room = [], limit - 12 - len(question) - sum(map(len, opt))
    for record in answers:
        room -= len(record)
        if room < 0:
            break
        fit.append(record)
    return header(q.qid, q.opcode, q.rd, rcode, (1, len(fit), 0, len(opt)), aa, tc=True) \
        + question + b"".join(fit + opt)


def answer(packet, udp, table):
    """The reply to one packet (None when it deserves none) and a log line."""
    if len(packet) < 12 or packet[2] & 0x80:
        return None, "ignored: too short, or a response"  # answering responses can loop
    qid, flags = struct.unpack_from("!HH", packet)
    try:
        q = parse_query(packet)
    except FormErr as e:
        return header(qid, flags >> 11 & 0xF, bool(flags & 0x100), FORMERR, (0, 0, 0, 0)), f"FORMERR: {e}"
    sections, aa = ([], [], []), False
    if q.opcode != 0:
        rcode = NOTIMP
    elif q.edns and q.edns[1] != 0:
        rcode = BADVERS
    elif q.qclass not in (IN, ANY):
        rcode = REFUSED
    elif table is None:
        rcode = SERVFAIL  # no records yet: let the client retry rather than cache
    else:
        rcode, *sections, aa = resolve(table, q.key, q.qtype)
    limit = (max(512, q.edns[0]) if q.edns else 512) if udp else 65535
    name = b".".join(q.labels).decode("latin-1")
    return build_reply(q, rcode, sections, aa, limit), \
        f"{name} {TYPE_NAMES.get(q.qtype, q.qtype)} -> rcode {rcode}, {len(sections[0])} answers"


class Source:
    """Keeps .table current by re-running the record source in the background."""

    def __init__(self, load, interval):
        self.table, self.load, self.interval, self.last_error = None, load, interval, "not loaded"

    def refresh(self):
        try:
            table = build_table(self.load())
        except Exception as e:  # whatever went wrong, serving the old table is better
            if str(e) != self.last_error:  # once per distinct failure, not every second
                log(f"record source failed, keeping the previous records: {e}")
            self.last_error = str(e)
            return False
        if self.last_error:
            log(f"records loaded: {len(table.names)} names")
        if table.skipped != (self.table.skipped if self.table else []):
            log(f"left out, the records cannot hold them: {'; '.join(table.skipped)}")
        self.table, self.last_error = table, None
        return True

    def start(self):
        self.refresh()
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        while True:
            time.sleep(self.interval)
            self.refresh()


def load_command(cmd):
    run = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30)
    if run.returncode != 0:
        raise RuntimeError(f"exit {run.returncode}: {run.stderr.strip()[-300:]}")
    return json.loads(run.stdout)


def load_file(path):
    with open(path) as f:
        return json.load(f)


def serve_packet(packet, udp, source, verbose, client):
    try:
        reply, line = answer(packet, udp, source.table)
    except Exception as e:  # untrusted input must never take the server down
        log(f"internal error on a packet from {client[0]}: {e!r}")
        return None
    if verbose:
        log(f"{client[0]} {'udp' if udp else 'tcp'} {line}")
    return reply


def start_servers(addr, port, source, verbose):
    class Udp(socketserver.BaseRequestHandler):
        def handle(self):
            packet, sock = self.request
            reply = serve_packet(packet, True, source, verbose, self.client_address)
            if reply:
                sock.sendto(reply, self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        timeout = 10  # idle clients must not hold a thread forever

        def handle(self):
            try:
                while len(head := self.rfile.read(2)) == 2:
                    packet = self.rfile.read(struct.unpack("!H", head)[0])
                    reply = serve_packet(packet, False, source, verbose, self.client_address)
                    if reply is None:
                        return
                    self.wfile.write(struct.pack("!H", len(reply)) + reply)
            except OSError:
                pass

    class UdpServer(socketserver.UDPServer):
        allow_reuse_address = True
        max_packet_size = 65535

    class TcpServer(socketserver.ThreadingTCPServer):
        allow_reuse_address, daemon_threads = True, True

    udp = UdpServer((addr, port), Udp)
    try:
        tcp = TcpServer((addr, udp.server_address[1]), Tcp)
    except OSError:
        udp.server_close()
        raise
    for server in (udp, tcp):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return udp, tcp


# ---------------------------------------------------------------- self-test

def fixture(late=False):
    def svc(name, **spec):
        return {"kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}

    def eps(name, addresses, ports, not_ready=()):
        return {"kind": "Endpoints", "metadata": {"name": name, "namespace": "default"},
                "subsets": [{"addresses": addresses, "notReadyAddresses": list(not_ready), "ports": ports}]}

    items = [
        svc("web", clusterIP="10.96.0.20", clusterIPs=["10.96.0.20"], type="ClusterIP",
            ports=[{"name": "http", "port": 80, "protocol": "TCP"}, {"port": 81, "protocol": "TCP"}]),
        eps("web", [{"ip": "10.32.0.8"}], [{"name": "http", "port": 8080, "protocol": "TCP"}]),
        svc("db", clusterIP="None", ports=[{"name": "pg", "port": 5432, "protocol": "TCP"}]),
        eps("db", [{"ip": "10.32.0.5", "hostname": "db-0"}, {"ip": "10.32.0.6"}],
            [{"name": "pg", "port": 5433, "protocol": "TCP"}], not_ready=[{"ip": "10.32.0.9"}]),
        svc("ext", type="ExternalName", externalName="example.com"),
        svc("big", clusterIP="None"),
        eps("big", [{"ip": f"10.40.0.{i}"} for i in range(1, 41)], []),
        {"kind": "Pod", "metadata": {"name": "client", "namespace": "default"},
         "status": {"podIP": "10.32.0.7", "podIPs": [{"ip": "10.32.0.7"}]}},
        {"kind": "Pod", "metadata": {"name": "old", "namespace": "default"}, "status": {"podIP": "10.32.0.10"}},
        {"kind": "Service", "spec": {}},  # broken: must be skipped, not fatal
    ]
    if late:
        items.append(svc("late", clusterIP="10.96.0.99"))
    return {"apiVersion": "v1", "kind": "List", "items": items}


def make_query(name, qtype, qid=0x1234, edns=None, version=0):
    q = struct.pack("!6H", qid, 0x0100, 1, 0, 0, 1 if edns else 0) + encode_name(name) + struct.pack("!HH", qtype, IN)
    return q + (rr(b"\0", OPT, b"", ttl=version << 16, rclass=edns) if edns else b"")


def rdata_value(msg, rtype, off, rdlen):
    """A readable form of the rdata at off: addresses and names as text,
    SRV as (priority, weight, port, target), anything else as bytes."""
    def name_at(o):
        return b".".join(read_name(msg, o)[0]).decode()

    if rtype in (A, AAAA):
        return str(ipaddress.ip_address(msg[off:off + rdlen]))
    if rtype in (CNAME, PTR):
        return name_at(off)
    if rtype == SRV:
        return struct.unpack_from("!3H", msg, off) + (name_at(off + 6),)
    return msg[off:off + rdlen]


def parse_reply(msg):
    qid, flags, qd, *counts = struct.unpack_from("!6H", msg)
    off = read_name(msg, 12)[1] + 4 if qd else 12
    sections = []
    for count in counts:
        records = []
        for _ in range(count):
            labels, off = read_name(msg, off)
            rtype, _, ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
            off += 10
            records.append((b".".join(labels).decode(), rtype, ttl, rdata_value(msg, rtype, off, rdlen)))
            off += rdlen
        sections.append(records)
    return {"id": qid, "rcode": flags & 0xF, "aa": bool(flags & 0x400), "tc": bool(flags & 0x200),
            "rd": bool(flags & 0x100), "ra": bool(flags & 0x80), "qname": read_name(msg, 12)[0] if qd else None,
            "an": sections[0], "ns": sections[1], "ar": sections[2]}


def ask_udp(port, packet, timeout=2.0):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, ("127.0.0.1", port))
        return s.recv(65535)


def ask_tcp(port, packet):
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(struct.pack("!H", len(packet)) + packet)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = s.recv(65535)
            if not chunk:
                raise OSError("connection closed early")
            data += chunk
        return data[2:]


def self_test():
    with tempfile.TemporaryDirectory(prefix="dns-self-test-") as tmp:
        return run_checks(os.path.join(tmp, "state.json"))


def run_checks(state):
    """Serves the fixture through the real source path (a command re-run in
    the background) and checks every kind of answer."""
    failures, checks = [], 0

    def check(ok, what):
        nonlocal checks
        checks += 1
        if not ok:
            failures.append(what)
            print(f"FAIL: {what}", file=sys.stderr)

    def q(name, qtype=A, tcp=False, **kw):
        packet = make_query(name, qtype, **kw)
        return parse_reply(ask_tcp(port, packet) if tcp else ask_udp(port, packet))

    def values(reply, section="an", rtype=None):
        return sorted(str(v) for _, t, _, v in reply[section] if rtype in (None, t))

    with open(state, "w") as f:
        json.dump(fixture(), f)
    source = Source(lambda: load_command(f"cat {state}"), 0.1)
    source.start()
    udp, tcp = start_servers("127.0.0.1", 0, source, False)
    port = udp.server_address[1]
    web = "web.default.svc.cluster.local"

    r = q(web)
    check(values(r) == ["10.96.0.20"], f"A {web}: {r['an']}")
    check(r["aa"] and r["rd"] and not r["ra"] and r["rcode"] == NOERROR and r["id"] == 0x1234, "flags")
    check(all(ttl == 5 for _, _, ttl, _ in r["an"]), "TTL 5")
    r = q("WEB.Default.SVC.Cluster.Local")
    check(values(r) == ["10.96.0.20"] and r["qname"][0] == b"WEB", "case-insensitive, question echoed as asked")
    check(values(q(web, tcp=True)) == ["10.96.0.20"], "A over TCP")
    check(values(q("10-32-0-8." + web)) == ["10.32.0.8"], "dashed endpoint of a ClusterIP service")
    check(values(q("db.default.svc.cluster.local")) == ["10.32.0.5", "10.32.0.6"], "headless: ready endpoints only")
    check(values(q("db-0.db.default.svc.cluster.local")) == ["10.32.0.5"], "endpoint hostname")
    check(values(q("10-32-0-6.db.default.svc.cluster.local")) == ["10.32.0.6"], "dashed endpoint IP")
    check(q("10-32-0-9.db.default.svc.cluster.local")["rcode"] == NXDOMAIN, "not-ready endpoint left out")
    check(values(q("10-32-0-7.default.pod.cluster.local")) == ["10.32.0.7"], "pod A")
    check(values(q("10-32-0-10.default.pod.cluster.local")) == ["10.32.0.10"], "pod A from podIP alone")
    check(q("10-1-1-1.default.pod.cluster.local")["rcode"] == NXDOMAIN, "unknown pod NXDOMAIN")
    r = q("_http._tcp." + web, SRV)
    check(values(r) == [f"(0, 100, 80, '{web}')"] and values(r, "ar") == ["10.96.0.20"], f"SRV + glue: {r}")
    r = q("_pg._tcp.db.default.svc.cluster.local", SRV)
    check(values(r) == ["(0, 100, 5433, '10-32-0-6.db.default.svc.cluster.local')",
                        "(0, 100, 5433, 'db-0.db.default.svc.cluster.local')"]
          and values(r, "ar") == ["10.32.0.5", "10.32.0.6"], f"headless SRV: {r}")
    check(q("_pg._tcp.db.default.svc.cluster.local")["an"] == [], "SRV name asked for A: NODATA")
    r = q("ext.default.svc.cluster.local")
    check(r["an"] == [("ext.default.svc.cluster.local", CNAME, TTL, "example.com")], f"ExternalName CNAME: {r}")
    for name, target in (("20.0.96.10.in-addr.arpa", web),
                         ("5.0.32.10.in-addr.arpa", "db-0.db.default.svc.cluster.local"),
                         ("8.0.32.10.in-addr.arpa", "10-32-0-8." + web),
                         ("7.0.32.10.in-addr.arpa", "10-32-0-7.default.pod.cluster.local")):
        check(values(q(name, PTR)) == [target], f"PTR {name} -> {target}")
    check(q("1.1.1.1.in-addr.arpa", PTR)["rcode"] == NXDOMAIN, "unknown PTR NXDOMAIN")
    for name, qtype, rcode in ((web, AAAA, NOERROR), ("svc.cluster.local", A, NOERROR),
                               ("nope.default.svc.cluster.local", A, NXDOMAIN)):
        r = q(name, qtype)
        check(r["rcode"] == rcode and r["an"] == [] and [t for _, t, _, _ in r["ns"]] == [SOA],
              f"{name} {qtype}: rcode {rcode} with SOA: {r}")
    r = q("example.com")
    check(r["rcode"] == NXDOMAIN and not r["aa"], "outside names NXDOMAIN")
    check(values(q("dns-version.cluster.local", TXT)) == [str(b"\x051.1.0")], "dns-version TXT")
    check(values(q("cluster.local", SOA), rtype=SOA) != [], "SOA at the apex")

    big = "big.default.svc.cluster.local"
    r = q(big)
    check(r["tc"] and 0 < len(r["an"]) < 40, f"over 512 bytes on UDP without EDNS: TC, {len(r['an'])} answers fit")
    check(len(make_query(big, A)) + 16 * len(r["an"]) <= 512, "the partial answer fits 512 bytes")
    r = q(big, edns=4096)
    check(not r["tc"] and len(r["an"]) == 40 and [t for _, t, _, _ in r["ar"]] == [OPT],
          "EDNS payload honoured, OPT echoed")
    check(q(big, edns=600)["tc"], "EDNS payload smaller than the answer: TC")
    r = q(big, tcp=True)
    check(not r["tc"] and len(r["an"]) == 40, "TCP carries the whole answer")
    check(q(web, edns=4096, version=1)["ar"][0][2] >> 24 == 1, "EDNS version 1: BADVERS")

    msg = b"\0" * 12 + b"\x07default\x03svc\x07cluster\x05local\x00" + b"\x03web\xc0\x0c"
    check(read_name(msg, 39)[0] == [b"web", b"default", b"svc", b"cluster", b"local"], "compressed names parse")
    loop = struct.pack("!6H", 7, 0x100, 1, 0, 0, 0) + b"\xc0\x0c\0\1\0\1"
    check(parse_reply(ask_udp(port, loop))["rcode"] == FORMERR, "pointer loop: FORMERR")
    two = struct.pack("!6H", 8, 0x100, 2, 0, 0, 0) + encode_name(web) + b"\0\1\0\1" * 2
    check(parse_reply(ask_udp(port, two))["rcode"] == FORMERR, "two questions: FORMERR")
    try:
        ask_udp(port, b"\1\2\3", timeout=0.3)
        check(False, "a 3-byte packet got a reply")
    except socket.timeout:
        check(True, "")
    rnd, good, alive = random.Random(53), make_query(web, A), 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        # Garbage and mutated queries, in rounds small enough for the socket
        # buffer (a flood would only test UDP drops), each followed by a real query.
        for _ in range(20):
            for _ in range(100):
                p = bytearray(good if rnd.random() < 0.5 else rnd.randbytes(rnd.randrange(40)))
                for _ in range(rnd.randrange(1, 4)):
                    if p:
                        p[rnd.randrange(len(p))] = rnd.randrange(256)
                s.sendto(bytes(p), ("127.0.0.1", port))
            alive += values(q(web)) == ["10.96.0.20"]
    check(alive == 20, f"answering after each round of garbage: {alive} of 20")

    with open(state, "w") as f:
        f.write("{broken")
    time.sleep(0.5)
    check(values(q(web)) == ["10.96.0.20"], "a failed refresh keeps the old records")
    with open(state, "w") as f:
        json.dump(fixture(late=True), f)
    deadline = time.monotonic() + 5
    while q("late.default.svc.cluster.local")["rcode"] != NOERROR and time.monotonic() < deadline:
        time.sleep(0.1)
    check(values(q("late.default.svc.cluster.local")) == ["10.96.0.99"], "a refresh brings new records")
    empty = Source(lambda: load_command("false"), 1)
    empty.refresh()
    check(parse_reply(answer(make_query(web, A), True, empty.table)[0])["rcode"] == SERVFAIL,
          "SERVFAIL before the first load")

    for server in (udp, tcp):
        server.shutdown()
        server.server_close()
    if failures:
        print(f"dns self-test: {len(failures)} of {checks} checks failed", file=sys.stderr)
        return 1
    print(f"dns self-test: {checks} checks ok")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", help="address to serve on (UDP and TCP)")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--source", help="command printing services, endpoints and pods as a JSON v1 List")
    p.add_argument("--source-file", help="read that List from a file instead")
    p.add_argument("--refresh", type=float, default=1.0, help="seconds between re-runs of the source")
    p.add_argument("--verbose", action="store_true", help="log every query to stderr")
    p.add_argument("--self-test", action="store_true")
    args = p.parse_args()
    if args.self_test:
        return self_test()
    if not args.listen or bool(args.source) == bool(args.source_file):
        p.error("--listen and exactly one of --source, --source-file are required")
    source = Source((lambda: load_command(args.source)) if args.source else (lambda: load_file(args.source_file)),
                    args.refresh)
    source.start()
    start_servers(args.listen, args.port, source, args.verbose)
    log(f"serving {DOMAIN} on {args.listen}:{args.port} (udp, tcp)")
    threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
