"""HTTP and websocket transport to one ComfyUI server (a small RFC 6455 reader: standard library only)."""

import base64
import hashlib
import json
import mimetypes
import os
import select
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from kontext_core.tools.comfyui_client.items import UPLOAD_SUBFOLDER, QueueError, ServerFault


class Server:
    """ComfyUI's HTTP API (the routes the frontend itself uses)."""

    def __init__(self, url: str, timeout: float = 30.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise QueueError(f"--server must be an http(s) URL such as http://127.0.0.1:8188, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, route: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
        request = urllib.request.Request(self.url + route, data=body, method=method, headers=headers or {})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()

    def json(self, method: str, route: str, payload: dict | None = None):
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return json.loads(self._request(method, route, body, headers))

    def check(self) -> dict:
        try:
            return self.json("GET", "/system_stats")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise QueueError(f"no ComfyUI answers at {self.url} ({getattr(e, 'reason', e)})") from None

    def upload_image(self, path: Path, name: str) -> str:
        """Uploads into input/kontext_queue/ under `name`; returns the value for LoadImage's `image`."""
        boundary = uuid.uuid4().hex
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        parts = [
            (
                f'Content-Disposition: form-data; name="image"; filename="{name}"\r\nContent-Type: {content_type}',
                path.read_bytes(),
            ),
            ('Content-Disposition: form-data; name="subfolder"', UPLOAD_SUBFOLDER.encode()),
            ('Content-Disposition: form-data; name="overwrite"', b"true"),
            ('Content-Disposition: form-data; name="type"', b"input"),
        ]
        body = b"".join(f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n" for head, data in parts)
        body += f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        try:
            answer = json.loads(self._request("POST", "/upload/image", body, headers))
        except urllib.error.HTTPError as e:
            raise (ServerFault if e.code >= 500 else QueueError)(f"uploading {path} failed: HTTP {e.code}") from None
        subfolder = answer.get("subfolder") or ""
        return f"{subfolder}/{answer['name']}" if subfolder else answer["name"]

    def queue_prompt(self, workflow: dict, client_id: str) -> str:
        try:
            answer = self.json("POST", "/prompt", {"prompt": workflow, "client_id": client_id})
        except urllib.error.HTTPError as e:
            error = ServerFault if e.code >= 500 else QueueError
            raise error(f"ComfyUI rejected the prompt (HTTP {e.code}): {describe_rejection(e.read())}") from None
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        entry = self.json("GET", f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
        return entry or None

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._request("GET", f"/view?{query}")

    def cancel(self, prompt_id: str) -> None:
        """Drops the prompt from the queue, or stops it if it is running; best effort."""
        for route in ("/queue", "/interrupt"):
            payload = {"delete": [prompt_id]} if route == "/queue" else {"prompt_id": prompt_id}
            try:
                self._request("POST", route, json.dumps(payload).encode(), {"Content-Type": "application/json"})
            except (urllib.error.URLError, OSError):
                pass


def describe_rejection(body: bytes) -> str:
    """ComfyUI's 400 body (`error` + `node_errors`) as one readable line naming the nodes and inputs."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:500]
    error = answer.get("error")
    text = [error.get("message", "") if isinstance(error, dict) else str(error)]
    if isinstance(error, dict) and error.get("details"):
        text[0] += f" ({error['details']})"
    for node_id, node in (answer.get("node_errors") or {}).items():
        problems = "; ".join(
            e.get("message", "") + (f": {e['details']}" if e.get("details") else "") for e in node.get("errors", [])
        )
        text.append(f"node {node_id} ({node.get('class_type', '?')}): {problems}")
    return " | ".join(t for t in text if t)


# ---------------------------------------------------------------- websocket


class WebSocketClosed(ConnectionError):
    pass


def frame_length(n: int, masked: bool) -> bytes:
    """A frame's second byte (mask bit, 7-bit length) and its extended length field (RFC 6455 §5.2)."""
    bit = 0x80 if masked else 0
    if n < 126:
        return bytes([bit | n])
    if n < 65536:
        return bytes([bit | 126]) + n.to_bytes(2, "big")
    return bytes([bit | 127]) + n.to_bytes(8, "big")


class WebSocket:
    """Just enough RFC 6455 to read ComfyUI's status messages: text frames in, pongs and a close out."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float = 10.0):
        parsed = urllib.parse.urlsplit(url)
        secure = parsed.scheme == "wss"
        port = parsed.port or (443 if secure else 80)
        sock = socket.create_connection((parsed.hostname, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parsed.hostname)
        self.sock, self.timeout, self.buffer = sock, timeout, bytearray()
        self.binary_messages = 0  # ComfyUI's previews, counted and skipped (the integration test reads the count)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            self.sock.close()
            raise ConnectionError(f"no websocket at {url}: {lines[0]}")

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise WebSocketClosed("the server closed the websocket")
        self.buffer += data

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        self.sock.sendall(bytes([0x80 | opcode]) + frame_length(len(payload), masked=True))
        mask = os.urandom(4)  # RFC 6455: every client frame is masked
        self.sock.sendall(mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, text: str) -> None:
        self._send(0x1, text.encode())

    def receive(self, wait: float) -> str | None:
        """The next text message, or None when nothing arrived within `wait` seconds."""
        if not self.buffer and not select.select([self.sock], [], [], wait)[0]:
            return None
        message, message_opcode = b"", None
        while True:
            first, second = self._take(2)
            fin, opcode, length = first & 0x80, first & 0x0F, second & 0x7F
            if length == 126:
                length = int.from_bytes(self._take(2), "big")
            elif length == 127:
                length = int.from_bytes(self._take(8), "big")
            mask = self._take(4) if second & 0x80 else None
            payload = self._take(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise WebSocketClosed("the server closed the websocket")
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            message += payload
            message_opcode = opcode if opcode else message_opcode
            if fin:
                if message_opcode == 0x1:
                    return message.decode()
                self.binary_messages += 1  # binary frames are ComfyUI's previews: not needed here
                return self.receive(0)

    def close(self) -> None:
        try:
            self._send(0x8)
        except OSError:
            pass
        self.sock.close()
