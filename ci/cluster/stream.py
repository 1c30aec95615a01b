#!/usr/bin/env python3
"""A TCP stream between two pods, run inside their network namespaces by
ci/cluster.sh: the client sends a numbered line every 20 ms until a stop
file appears; the server records when each line arrives and prints the
longest gap between arrivals and whether the connection lasted.

  stream.py server ADDR PORT STOPFILE   -> prints JSON {"lines", "max_gap_s", "ended_by"}
  stream.py client ADDR PORT STOPFILE
"""
import json
import os
import socket
import sys
import time

INTERVAL = 0.02


def server(addr, port, stop):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(1)
    conn, _ = ls.accept()
    conn.settimeout(0.5)
    last, max_gap, lines, buf, ended = time.monotonic(), 0.0, 0, b"", "stop"
    while not os.path.exists(stop):
        try:
            data = conn.recv(65536)
        except socket.timeout:
            continue
        except OSError as e:
            ended = f"error: {e}"
            break
        if not data:
            if not os.path.exists(stop):
                ended = "closed by the client"
            break
        now = time.monotonic()
        max_gap = max(max_gap, now - last)
        last = now
        buf += data
        lines += buf.count(b"\n")
        buf = buf[buf.rfind(b"\n") + 1:]
    # a stream that went silent and never came back is one long gap
    max_gap = max(max_gap, time.monotonic() - last)
    print(json.dumps({"lines": lines, "max_gap_s": round(max_gap, 3), "ended_by": ended}))


def client(addr, port, stop):
    s = socket.create_connection((addr, port), timeout=5)
    s.settimeout(None)
    i = 0
    while not os.path.exists(stop):
        s.sendall(b"%d\n" % i)
        i += 1
        time.sleep(INTERVAL)
    s.close()


if __name__ == "__main__":
    mode, addr, port, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    {"server": server, "client": client}[mode](addr, port, stop)
