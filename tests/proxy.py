"""A TCP proxy for fault tests: forward a local port to a server, and cut the link at will.

It runs inside pytest's process (the daemon under test is a subprocess) on one background
thread polling non-blocking sockets, and every method returns once its fault is in place:

- ``hold()``: a silent partition. Nothing is forwarded and nothing is read, in either
  direction, and nothing is closed: each peer's data piles up in the kernel buffers and
  neither side sees an error. New connections wait in the listen backlog. ``release()``
  ends it and forwards what piled up.
- ``drop()``: every current connection is reset (RST to both peers: SO_LINGER 0).
- ``refuse()`` / ``accept()``: new connections are closed at once / forwarded again.

A connection reset by one peer is reset on the other side too; an EOF is passed on as one.
"""

from __future__ import annotations

import queue
import select
import socket
import struct
import threading
from collections.abc import Callable

BUFFER = 1 << 20          # per direction: reading from a peer stops while this much waits
CHUNK = 1 << 16
LINGER_RST = struct.pack("ii", 1, 0)
READ = select.POLLIN | select.POLLPRI
FAULT = select.POLLERR | select.POLLHUP | select.POLLNVAL


def _reset(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass
    sock.close()


class _Link:
    """One client connection and its connection to the target."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.socks = (client, upstream)
        # bufs[i]: read from socks[i], waiting to be written to socks[1 - i]
        self.bufs = (bytearray(), bytearray())
        self.eof = [False, False]      # socks[i] sent its EOF
        self.shut = [False, False]     # socks[i]'s write side is shut (EOF passed on)

    def reset(self) -> None:
        for s in self.socks:
            _reset(s)

    def close(self) -> None:
        for s in self.socks:
            s.close()


class Proxy:
    """Forward ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``; see the module doc."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.held = False
        self.refusing = False
        self.accepted = 0              # connections forwarded so far
        self.links: list[_Link] = []
        self.error: BaseException | None = None
        self._closing = False
        self._ops: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = \
            queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"proxy-{self.port}",
                                        daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Connections currently forwarded (or held)."""
        return len(self.links)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- faults (each in place when the call returns) -----------------------------------------

    def hold(self) -> None:
        """Stop forwarding and reading, both ways, closing nothing: a silent partition."""
        self._do(lambda: setattr(self, "held", True))

    def release(self) -> None:
        """End a hold: forward again, what piled up first."""
        self._do(lambda: setattr(self, "held", False))

    def drop(self) -> None:
        """Reset every current connection (RST both ways), held or waiting ones included."""
        self._do(self._drop_all)

    def refuse(self) -> None:
        """Close new connections at once."""
        self._do(lambda: setattr(self, "refusing", True))

    def accept(self) -> None:
        """Forward new connections again."""
        self._do(lambda: setattr(self, "refusing", False))

    def close(self) -> None:
        """Reset every connection, stop listening and stop the thread."""
        if self._thread.is_alive():
            self._do(self._shutdown)
            self._thread.join(10)
        for s in (self.listener, self._wake_r, self._wake_w):
            s.close()
        if self.error is not None:
            raise RuntimeError(f"proxy {self.addr} failed: {self.error!r}") from self.error

    # --- the loop thread ------------------------------------------------------------------------

    def _do(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread between two polls; return once it has run."""
        if self.error is not None:
            raise RuntimeError(f"proxy {self.addr} failed: {self.error!r}") from self.error
        if not self._thread.is_alive():
            raise RuntimeError(f"proxy {self.addr} is closed")
        done = threading.Event()
        self._ops.put((fn, done))
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError(f"proxy {self.addr}: the loop thread does not answer")

    def _drop_all(self) -> None:
        for link in self.links:
            link.reset()
        self.links.clear()
        while True:   # connections still in the listen backlog (made during a hold)
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            _reset(sock)

    def _shutdown(self) -> None:
        self._drop_all()
        self._closing = True

    def _run(self) -> None:
        try:
            while not self._closing:
                self._poll()
        except BaseException as exc:   # reported by the next call and by close()
            self.error = exc
            for link in self.links:
                link.reset()
            self.links.clear()
        finally:
            while not self._ops.empty():   # never leave a caller waiting
                self._ops.get()[1].set()

    def _poll(self) -> None:
        while not self._ops.empty():
            fn, done = self._ops.get()
            try:
                fn()
            finally:
                done.set()
        if self._closing:
            return
        poller = select.poll()
        poller.register(self._wake_r, READ)
        if not self.held:
            poller.register(self.listener, READ)
        owners: dict[int, tuple[_Link, int]] = {}
        for link in [] if self.held else self.links:
            for i in (0, 1):
                mask = 0
                if not link.eof[i] and len(link.bufs[i]) < BUFFER:
                    mask |= READ
                if link.bufs[1 - i]:
                    mask |= select.POLLOUT
                if mask:
                    fd = link.socks[i].fileno()
                    poller.register(fd, mask)
                    owners[fd] = (link, i)
        for fd, events in poller.poll(1000):
            if fd == self._wake_r.fileno():
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            elif fd == self.listener.fileno():
                self._accept()
            elif fd in owners:
                link, i = owners[fd]
                if link in self.links:
                    self._serve(link, i, events)
        for link in list(self.links):
            self._pass_eof(link)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.refusing:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)   # the target is down: the client sees its connection reset
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.links.append(_Link(client, upstream))
        self.accepted += 1

    def _serve(self, link: _Link, i: int, events: int) -> None:
        """Read from and write to ``link.socks[i]`` as ``events`` allow."""
        sock = link.socks[i]
        try:
            if events & (READ | FAULT) and not link.eof[i] and len(link.bufs[i]) < BUFFER:
                data = sock.recv(CHUNK)
                if data:
                    link.bufs[i].extend(data)
                else:
                    link.eof[i] = True
            out = link.bufs[1 - i]
            if events & (select.POLLOUT | FAULT) and out:
                sent = sock.send(out)
                del out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:   # reset, broken pipe: reset the other side as well
            link.reset()
            self.links.remove(link)

    def _pass_eof(self, link: _Link) -> None:
        """Shut the write side of a peer once the other one's EOF and data are through;
        close the link when both directions are done."""
        for i in (0, 1):
            j = 1 - i
            if link.eof[i] and not link.bufs[i] and not link.shut[j]:
                try:
                    link.socks[j].shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                link.shut[j] = True
        if all(link.shut):
            link.close()
            self.links.remove(link)
