"""A stand-in for a vLLM server with our weight-transfer backend, for the main suite (no vLLM):
the RL endpoints `serve.client.VLLMServer` drives, over real HTTP on 127.0.0.1, and a real
`serve.reader.receive` of the writers' streams. It keeps every tensor it received per version,
so a test can compare them with the files the export wrote."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from megatron_trt_ext.serve import reader


class FakeVLLM:
    def __init__(self, fail_after: int = -1):
        self.world_size = 1  # one server worker
        self.fail_after = fail_after  # >= 0: the stream breaks after that many tensors (a dying server)
        self.version = "initial"
        self.paused = False
        self.received: dict = {}  # version -> {hf name: tensor}
        self.calls: list = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = self.path.split("?")[0]
                answers = {"/get_world_size": {"world_size": fake.world_size},
                           "/weight_info": {"weight_version": fake.version},
                           "/is_paused": {"is_paused": fake.paused}}
                self._answer(200, answers[path]) if path in answers else self._answer(404, {})

            def do_POST(self):
                path = self.path.split("?")[0]
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                fake.calls.append(path)
                try:
                    fake.post(path, body)
                except Exception as exc:  # noqa: BLE001 - what vLLM answers on a failed step
                    self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})
                    return
                self._answer(200, {})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def post(self, path: str, body: dict) -> None:
        if path == "/pause":
            self.paused = True
        elif path == "/resume":
            self.paused = False
        elif path == "/update_weight_version":
            self.version = str(body["new_version"])
        elif path == "/finish_weight_update":
            if "weight_version" in body:
                self.version = str(body["weight_version"])
        elif path == "/update_weights":
            info = body["update_info"]
            got: dict = {}

            def apply(batch: dict) -> None:
                for name, tensor in batch.items():
                    assert name not in got, f"{name} arrived twice"
                    if len(got) == self.fail_after:
                        raise ConnectionResetError("the server died mid-refit")
                    got[name] = tensor

            reader.receive(info["writers"], info["token"], apply, rank=0, timeout=info.get("timeout") or 60)
            with self.lock:
                self.received[str(info["version"])] = dict(got)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
