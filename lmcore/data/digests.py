"""sha256 of every text of a chunk, optionally in a helper process.

A record id is the sha256 of its cleaned text (``clean.record_id``). Hashing millions of short
texts is Python-bound: hashlib holds the GIL for inputs under 2 KiB, so a thread cannot hash
them beside validation. ``Sha256Worker`` hands a chunk's UTF-8 bytes and offsets to a small child
interpreter (stdlib only, no site-packages: it starts in milliseconds) over a Unix socket, and
the caller waits without the GIL. One ``sendmsg`` and one ``recv_into(MSG_WAITALL)`` per chunk:
a pipe would move it in 64 KiB pieces, and each piece returning to a thread means taking the GIL
back from the validating thread (up to 5 ms each, a convoy that slows both). If the worker cannot
start or dies, the same digests are computed in process: the result never depends on where.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from hashlib import sha256
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lmcore.data.clean import string_layout
from lmcore.errors import LmopsError

# The child, its stdin and stdout one end of a socket pair: per request n and size (int64, native
# order: same machine), n+1 int64 offsets and size bytes of text; answers n 32-byte digests.
# SIGINT is ignored (a Ctrl-C reaches the whole process group; the parent decides); EOF or a
# closed socket -- the parent is done or died -- ends it quietly.
_WORKER = r"""
import os, signal, struct, sys
from hashlib import sha256
signal.signal(signal.SIGINT, signal.SIG_IGN)
r, w = sys.stdin.buffer, sys.stdout.buffer
try:
    while head := r.read(16):
        n, size = struct.unpack("qq", head)
        offs = memoryview(r.read(8 * (n + 1))).cast("q").tolist()
        data = r.read(size)
        w.write(b"".join([sha256(data[a:b]).digest() for a, b in zip(offs, offs[1:])]))
        w.flush()
except (BrokenPipeError, ConnectionResetError):
    os._exit(0)  # no one is listening: nothing to flush or report
"""
MIN_ROWS = 4096  # smaller chunks are hashed in process: a round trip would cost more than it saves


def sha256_digests(arr: Any) -> bytes:
    """The 32-byte sha256 digests of every text of an Arrow string array, concatenated (in process)."""
    return b"".join([sha256(b).digest() for b in pc.cast(arr, pa.large_binary()).to_pylist()])


class Sha256Worker:
    """A helper process hashing chunks of texts; ``digests`` falls back to in-process hashing.

    Started on the first chunk big enough to be worth it; one request at a time (one caller).
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.failed = False

    def __enter__(self) -> Sha256Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def digests(self, arr: Any) -> bytes:
        """Digests of every text of a null-free Arrow string array (as ``sha256_digests``)."""
        if len(arr) >= MIN_ROWS and self._started():
            try:
                out = self._ask(arr)
            except (OSError, ValueError):  # the worker died (or its pipe broke): hash here from now on
                self.close()
                self.failed = True
            else:
                last = arr[len(arr) - 1].as_py().encode("utf-8")
                if out[-32:] != sha256(last).digest():
                    raise LmopsError("sha256 worker returned wrong digests (lmcore.data.digests is broken)")
                return out
        return sha256_digests(arr)

    def _started(self) -> bool:
        if self.proc is None and not self.failed:
            ours, theirs = socket.socketpair()
            try:
                self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WORKER], stdin=theirs, stdout=theirs)
                self.sock = ours
            except (OSError, ValueError):
                ours.close()
                self.failed = True
            finally:
                theirs.close()
        return self.proc is not None

    def _ask(self, arr: Any) -> bytes:
        assert self.sock is not None
        n = len(arr)
        offsets, data = string_layout(arr)
        request = [struct.pack("qq", n, len(data)), memoryview(offsets).cast("B"), memoryview(data).cast("B")]
        sent = self.sock.sendmsg(request)
        if sent < sum(len(b) for b in request):  # a signal cut the call short: send the rest
            self.sock.sendall(b"".join(request)[sent:])
        out = bytearray(32 * n)
        view, got = memoryview(out), 0
        while got < len(out):
            k = self.sock.recv_into(view[got:], len(out) - got, socket.MSG_WAITALL)
            if not k:
                raise OSError("sha256 worker exited")
            got += k
        return bytes(out)

    def close(self) -> None:
        """End the worker (EOF on its socket), killing it if it does not go within seconds."""
        proc, sock, self.proc, self.sock = self.proc, self.sock, None, None
        if sock is not None:
            sock.close()
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
