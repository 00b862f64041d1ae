#!/usr/bin/env bash
# Remakes docs/space_screenshot.png: the Space `python -m gd_hf.space` writes for the demo model, its first
# example clicked in headless Chromium, the page captured at 1280x900.
#
#   bash docs/make_space_screenshot.sh [EXPORT] [IMAGES]
#
# EXPORT (default outputs/demo_synthetic/final: copied, never modified) gets the first three images of IMAGES
# (default data/synthetic/val) as its examples. Needs chromium (Debian: apt-get install chromium), curl and a
# Python with gd_hf's requirements and gradio ($PYTHON, default python). Nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
EXPORT=${1:-outputs/demo_synthetic/final}
IMAGES=${2:-data/synthetic/val}
PYTHON=${PYTHON:-python}
PORT=${PORT:-7871}
DEVTOOLS_PORT=${DEVTOOLS_PORT:-9233}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

cp -r "$EXPORT" "$WORK/export"
mkdir -p "$WORK/export/examples"
find "$IMAGES" -maxdepth 1 -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \) | sort | head -3 |
  while read -r image; do cp "$image" "$WORK/export/examples/"; done
timeout 120 "$PYTHON" -m gd_hf.space "$WORK/export" "$WORK/space" --title "gd_hf demo: synthetic shapes"

(cd "$WORK/space" && exec env -u PYTHONPATH HF_HUB_OFFLINE=1 GRADIO_SERVER_NAME=127.0.0.1 \
  GRADIO_SERVER_PORT="$PORT" timeout 600 "$PYTHON" app.py >"$WORK/app.log" 2>&1) &
PIDS+=($!)
timeout 120 bash -c "until curl -sf -o /dev/null http://127.0.0.1:$PORT/; do sleep 0.5; done"

timeout 600 chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,900 \
  --remote-debugging-port="$DEVTOOLS_PORT" about:blank >"$WORK/chromium.log" 2>&1 &
PIDS+=($!)
timeout 60 bash -c "until curl -sf -o /dev/null http://127.0.0.1:$DEVTOOLS_PORT/json/version; do sleep 0.5; done"

# A minimal DevTools-protocol client (the standard library's sockets: no websocket package needed): open the
# page, click the first example, wait for the overlay and the table, capture.
timeout 180 "$PYTHON" - "http://127.0.0.1:$PORT/" "$DEVTOOLS_PORT" docs/space_screenshot.png <<'EOF'
import base64, json, os, socket, struct, sys, time, urllib.request

page_url, devtools_port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list"))
ws_url = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
host, _, path = ws_url.removeprefix("ws://").partition("/")
sock = socket.create_connection((host.split(":")[0], int(host.split(":")[1])))
key = base64.b64encode(os.urandom(16)).decode()
sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
handshake = b""
while b"\r\n\r\n" not in handshake:
    handshake += sock.recv(1)
assert b" 101 " in handshake.split(b"\r\n")[0], handshake


def exactly(n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("devtools closed the connection")
        data += chunk
    return data


def send(text):  # one masked text frame, as a client must send
    payload, mask = text.encode(), os.urandom(4)
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    sock.sendall(bytes([0x81]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def receive():
    message = b""
    while True:
        first, second = exactly(2)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack(">H", exactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", exactly(8))[0]
        message += exactly(n)
        if first & 0x80:  # the last fragment
            return json.loads(message)


calls = 0


def call(method, **params):
    global calls
    calls += 1
    send(json.dumps({"id": calls, "method": method, "params": params}))
    while True:
        reply = receive()
        if reply.get("id") == calls:
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply["result"]


def evaluate(expression):
    return call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def wait_for(expression, timeout_s=60):
    deadline = time.time() + timeout_s
    while not evaluate(expression):
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {expression}")
        time.sleep(0.25)


call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
call("Page.navigate", url=page_url)
wait_for("document.querySelectorAll('tr.tr-body').length > 0")
images_before = evaluate("document.querySelectorAll('img').length")
evaluate("document.querySelector('tr.tr-body').click()")
# The example's image in the input, the overlay in the output, and the table's rows.
wait_for(f"document.querySelectorAll('img').length >= {images_before + 2}")
time.sleep(2)  # the table and the images finish rendering
shot = call("Page.captureScreenshot", format="png")
with open(out, "wb") as f:
    f.write(base64.b64decode(shot["data"]))
print(f"wrote {out}")
EOF
