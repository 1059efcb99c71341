"""A local Cloud Storage for the tests: gcp-storage-emulator, and a way for each client to reach it.

Run as a script (`python tests/gcs_emulator.py DIR`), it serves the GCS JSON API on 127.0.0.1 and
prints one JSON line with what each client needs; `start(dir)` runs it as a child process and
returns that environment. The clients, and how each is pointed at it:

* tensorstore (orbax's arrays, and vit_cls.storage's lock object): `TENSORSTORE_GCS_HTTP_URL`, its
  own endpoint setting, plus `GOOGLE_AUTH_TOKEN_FOR_TESTING` instead of credentials.
* TensorFlow's GCS file system (`tf.io.gfile`, hence `etils.epath`, orbax's directories, TFDS,
  tf.data, TensorBoard's writer): it has no endpoint setting; its requests go to
  https://www.googleapis.com (hard-coded in tensorflow-cpu 2.21). It does honour `https_proxy`
  (libcurl's) and `CURL_CA_BUNDLE`, so a CONNECT proxy here answers for *.googleapis.com with a
  certificate from a throwaway CA and forwards each request, decrypted, to the emulator. The client
  code is TensorFlow's own, unchanged: what a Cloud TPU VM runs.
* `STORAGE_EMULATOR_HOST` is set too, for clients that read it (google-cloud-storage, gcsfs).

gcp-storage-emulator 2026.7.19 lacks five things real GCS does, patched in here: an upload of zero
bytes (TensorFlow's directory markers) fails, preconditions (`ifGenerationMatch`) are ignored, a
download does not say its generation (`x-goog-generation`), a listing ignores its name range
(`startOffset`, `endOffset`), and a bucket has no `storageLayout` (TensorFlow reads it before it
renames a folder).
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

BUCKET = "vit-cls-test"
_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_certificates(directory: str) -> tuple[str, str]:
  """A throwaway CA (ca.pem), and a certificate for the API hosts signed by it (server.pem)."""
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

  now = datetime.datetime.now(datetime.timezone.utc)
  day = datetime.timedelta(days=1)

  def cert(subject, issuer, public_key, signing_key, serial, extensions):
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(
        public_key).serial_number(serial).not_valid_before(now - day).not_valid_after(now + day))
    for ext, critical in extensions:
      builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())

  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vit_cls test CA")])
  ca = cert(ca_name, ca_name, ca_key.public_key(), ca_key, 1,
            [(x509.BasicConstraints(ca=True, path_length=None), True)])
  server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _HOSTS[0])]), ca_name,
                key.public_key(), ca_key, 2,
                [(x509.SubjectAlternativeName([x509.DNSName(h) for h in _HOSTS]), False)])
  pem = serialization.Encoding.PEM
  ca_path, server_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "server.pem")
  with open(ca_path, "wb") as f:
    f.write(ca.public_bytes(pem))
  with open(server_path, "wb") as f:
    f.write(
        server.public_bytes(pem) +
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
  return ca_path, server_path


# ----------------------------------------------------------------------------------------------------
# The proxy: CONNECT *.googleapis.com:443 -> TLS with the test certificate -> HTTP to the emulator.


class _Forward(BaseHTTPRequestHandler):
  """One decrypted connection: each request on it is sent to the emulator, answered from there."""

  protocol_version = "HTTP/1.1"
  emulator_port = 0

  def _forward(self):
    # TensorFlow's uploads send a Content-Length and a chunked body: the chunking is what counts.
    if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
      body = b""
      while True:
        size = int(self.rfile.readline().strip() or b"0", 16)
        if size == 0:
          self.rfile.readline()
          break
        body += self.rfile.read(size)
        self.rfile.readline()
    else:
      length = int(self.headers.get("Content-Length") or 0)
      body = self.rfile.read(length) if length else None
    headers = {
        k: v
        for k, v in self.headers.items()
        if k.lower() not in ("host", "connection", "transfer-encoding", "content-length",
                             "proxy-connection")
    }
    if body is not None:
      headers["Content-Length"] = str(len(body))
    conn = http.client.HTTPConnection("127.0.0.1", self.emulator_port, timeout=60)
    conn.request(self.command, self.path, body=body, headers=headers)
    answer = conn.getresponse()
    data = answer.read()
    conn.close()
    self.send_response(answer.status, answer.reason)
    for k, v in answer.getheaders():
      if k.lower() == "location":  # a resumable upload's session URL: keep the client on this path
        v = v.replace(f"http://127.0.0.1:{self.emulator_port}", f"https://{self.headers['Host']}")
      if k.lower() not in ("transfer-encoding", "connection", "content-length"):
        self.send_header(k, v)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  def log_message(self, *args):  # pylint: disable=arguments-differ
    pass


class _Connect(socketserver.StreamRequestHandler):
  context: ssl.SSLContext = None

  def handle(self):
    line = self.rfile.readline().decode("latin-1")
    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
      pass
    if not line.startswith("CONNECT ") or line.split()[1].split(":")[0] not in _HOSTS:
      self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
      return
    self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    self.wfile.flush()
    try:
      tls = self.context.wrap_socket(self.connection, server_side=True)
      _Forward(tls, self.client_address, self.server)
    except (OSError, ssl.SSLError):
      pass  # the client went away


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
  daemon_threads = True
  allow_reuse_address = True


# ----------------------------------------------------------------------------------------------------
# A faulty network between tensorstore and the emulator, for the lease tests.


class FaultyProxy:
  """Plain HTTP in front of the emulator, in a thread of the test process: point a client at it with
  TENSORSTORE_GCS_HTTP_URL=proxy.url. Every request is forwarded, except that `fault(method, url)`,
  asked once per request, may answer "drop" (forward it, so it lands, then close the connection
  without an answer: a response lost on the way back) or "hang" (forward nothing, answer nothing:
  a network partition). `seen` lists (method, url, what was done) in order."""

  def __init__(self, emulator_url: str, fault):
    import http.server  # pylint: disable=g-import-not-at-top
    from urllib.parse import urlparse  # pylint: disable=g-import-not-at-top
    target = urlparse(emulator_url)
    self.seen: list[tuple[str, str, str]] = []
    self._release = threading.Event()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        action = fault(self.command, self.path) or "forward"
        proxy.seen.append((self.command, self.path, action))
        if action == "hang":
          proxy._release.wait()  # until the proxy is closed; the client gives up first
          self.close_connection = True
          return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "connection", "content-length")}
        if body is not None:
          headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        conn.request(self.command, self.path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        if action == "drop":  # it landed; the client never hears so
          self.close_connection = True
          self.connection.shutdown(socket.SHUT_RDWR)
          return
        self.send_response(answer.status, answer.reason)
        for k, v in answer.getheaders():
          if k.lower() not in ("transfer-encoding", "connection", "content-length"):
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
          self.wfile.write(data)

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

      def log_message(self, *args):  # pylint: disable=arguments-differ
        pass

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def close(self) -> None:
    self._release.set()
    self._server.shutdown()
    self._server.server_close()


# ----------------------------------------------------------------------------------------------------
# The emulator, with what it lacks.


def _answer(handler, status: HTTPStatus, obj: dict) -> None:
  body = json.dumps(obj).encode()
  handler.send_response(status.value, status.phrase)
  handler.send_header("Content-Type", "application/json")
  handler.send_header("Content-Length", str(len(body)))
  handler.end_headers()
  handler.wfile.write(body)


# A file of object-name prefixes, one a line, whose objects answer 403 to reads (metadata and media),
# as objects the caller's service account may not read do. Listings still show them, as in real GCS.
_DENY_FILE = ""


def _denied_object(path: str, query: dict) -> str | None:
  """The object a request reads when a deny-list prefix covers it, else None."""
  from urllib.parse import unquote  # pylint: disable=g-import-not-at-top
  if not _DENY_FILE or not os.path.exists(_DENY_FILE):
    return None
  m = re.fullmatch(r"(?:/download)?(?:/storage/v1)?/b/[-.\w]+/o/(.+)", path)
  if not m:
    return None
  name = unquote(m.group(1))
  with open(_DENY_FILE, encoding="utf-8") as f:
    prefixes = [line.strip() for line in f if line.strip()]
  return name if any(name.startswith(p) for p in prefixes) else None


def _patch_emulator() -> None:
  from gcp_storage_emulator import exceptions  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  media_upload = objects._media_upload  # pylint: disable=protected-access

  def empty_aware_media_upload(request, response, storage):
    if request.data is None:  # a zero-byte body reads as "no body"
      request._data = b""  # pylint: disable=protected-access
    return media_upload(request, response, storage)

  objects._media_upload = empty_aware_media_upload  # pylint: disable=protected-access

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    """GCS names the generation of the bytes it sends (tensorstore reads it for its conditions)."""
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
    except exceptions.NotFound:
      pass

  objects.download = download_with_generation

  from gcp_storage_emulator import storage as storage_lib  # pylint: disable=g-import-not-at-top
  request_query = threading.local()
  get_file_list = storage_lib.Storage.get_file_list

  def file_list_in_range(self, *args, **kwargs):
    """A listing's `startOffset` and `endOffset` (tensorstore lists a folder as that name range)."""
    objs, prefixes = get_file_list(self, *args, **kwargs)
    query = getattr(request_query, "value", {})
    start, end = query.get("startOffset", [None])[0], query.get("endOffset", [None])[0]
    objs = [
        o for o in objs
        if (start is None or o["name"] >= start) and (end is None or o["name"] < end)
    ]
    return objs, prefixes

  storage_lib.Storage.get_file_list = file_list_in_range

  handle = server.Router.handle

  def precondition_aware_handle(self, method=None):
    """`ifGenerationMatch` as GCS documents it: 0 = the object must not exist, else its
    generation."""
    from urllib.parse import parse_qs, unquote, urlparse  # pylint: disable=g-import-not-at-top
    url = urlparse(self._request_handler.path)
    query = parse_qs(url.query)
    request_query.value = query
    layout = re.fullmatch(r"(?:/storage/v1)?/b/([-.\w]+)/storageLayout", url.path)
    if layout:  # TensorFlow asks before renaming a folder (hierarchical namespace or not)
      return _answer(
          self._request_handler, HTTPStatus.OK, {
              "kind": "storage#storageLayout",
              "bucket": layout.group(1),
              "location": "US",
              "locationType": "multi-region",
              "hierarchicalNamespace": {
                  "enabled": False
              }
          })
    denied = _denied_object(url.path, query)
    if denied is not None and self._request_handler.command in ("GET", "HEAD"):
      return _answer(self._request_handler, HTTPStatus.FORBIDDEN, {"error": {
          "code": 403, "message": f"{denied}: the caller does not have storage.objects.get access"}})
    wanted = query.get("ifGenerationMatch", [None])[0]
    if wanted is not None:
      parts = url.path.split("/b/", 1)[-1].split("/o", 1)
      bucket = parts[0]
      name = query["name"][0] if "name" in query else unquote(parts[1].lstrip("/"))
      try:
        current = str(self._request_handler.storage.get_file_obj(bucket, name)["generation"])
      except exceptions.NotFound:
        current = "0"
      if current != wanted:
        length = int(self._request_handler.headers.get("Content-Length") or 0)
        if length:
          self._request_handler.rfile.read(length)
        return _answer(self._request_handler, HTTPStatus.PRECONDITION_FAILED,
                       {"error": {
                           "code": 412,
                           "message": "Precondition Failed"
                       }})
    return handle(self, method) if method is not None else handle(self)

  server.Router.handle = precondition_aware_handle


def serve(directory: str) -> None:
  """Runs the emulator and the proxy until killed; prints the clients' environment (one JSON
  line)."""
  import logging  # pylint: disable=g-import-not-at-top
  logging.disable(logging.CRITICAL)
  global _DENY_FILE
  _DENY_FILE = os.path.join(directory, "deny.txt")
  _patch_emulator()
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  emulator_port, proxy_port = _free_port(), _free_port()
  emulator = create_server("127.0.0.1", emulator_port, in_memory=True, default_bucket=BUCKET)
  emulator.start()
  ca, server_pem = _write_certificates(directory)
  _Forward.emulator_port = emulator_port
  _Connect.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  _Connect.context.load_cert_chain(server_pem)
  proxy = _Server(("127.0.0.1", proxy_port), _Connect)
  threading.Thread(target=proxy.serve_forever, daemon=True).start()
  endpoint = f"http://127.0.0.1:{emulator_port}"
  print(json.dumps({
      "TENSORSTORE_GCS_HTTP_URL": endpoint,
      "STORAGE_EMULATOR_HOST": endpoint,
      "https_proxy": f"http://127.0.0.1:{proxy_port}",
      "CURL_CA_BUNDLE": ca,
      "no_proxy": "127.0.0.1,localhost",
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "NO_GCE_CHECK": "true",
      "GCS_BUCKET": BUCKET,
      "GCS_EMULATOR_DENY_FILE": _DENY_FILE,
  }),
        flush=True)
  threading.Event().wait()


def start(directory: str) -> tuple[subprocess.Popen, dict]:
  """The emulator as a child process; returns it and the environment variables its clients need."""
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), directory],
                          stdout=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  if not line:
    proc.kill()
    raise RuntimeError("the GCS emulator did not start (is gcp-storage-emulator installed?)")
  return proc, json.loads(line)


if __name__ == "__main__":
  serve(sys.argv[1])
