"""The transport between the server and the engine process: SPSC byte rings over shared memory plus fd wake-ups.

A `Channel` is one process's end of a pair: it sends on one ring and receives on the other. The parent builds the
pair with `create_channel_pair()`, keeps its `Channel` (which owns and unlinks the segments), and hands the
picklable `ChannelHandles` to a child started with any multiprocessing context (spawn included), where
`handles.attach()` gives the child's `Channel`. Measured designs and pitfalls: reference/cpu-feasibility.md §5.

Ring segment (byte offsets; counters are u64, written with one aligned native store so a reader never sees a torn
value; head and tail sit on separate cache lines):

    0      head      bytes consumed since creation   (written by the consumer only)
    64     tail      bytes produced since creation   (written by the producer only)
    72     capacity  size of the data area in bytes, a multiple of 8
    128..  data      records [u32 length | payload | pad to 8]; a payload may wrap from the end of the data area
                     to its start; a length word never wraps (it starts 8-aligned in an area that is a multiple of 8)

The producer writes a record, then publishes tail; the consumer reads up to tail, then publishes head. That
order is enough on x86 (TSO keeps stores in order and loads in order); a weakly ordered CPU would need fences.
"""

from __future__ import annotations

import os
import secrets
import select
import struct
import time
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.shared_memory import SharedMemory

DEFAULT_RING_CAPACITY = 4 * 2**20  # bytes per direction: a whole 8k-token prompt is ~50 KB on the wire
SHM_PREFIX = "kairos_"

_HEADER_BYTES = 128
_HEAD, _TAIL, _CAPACITY = 0, 8, 9  # indexes into the header viewed as u64
_LENGTH = struct.Struct("=I")
_MAX_BACKOFF_S = 1e-3


class RecordTooLargeError(ValueError):
    """A record that can never fit in the ring, however long the producer waits."""


def _record_bytes(payload_len: int) -> int:
    return (_LENGTH.size + payload_len + 7) & ~7


class ByteRing:
    """A single-producer single-consumer ring of variable-length byte records in one shared-memory segment.

    One process calls only `put_nowait` (the producer), the other only `get_all` (the consumer). Never blocks.
    """

    def __init__(self, shm: SharedMemory, is_owner: bool) -> None:
        self._shm = shm
        self._is_owner = is_owner
        self._counters = shm.buf[:_HEADER_BYTES].cast("Q")
        self.capacity = self._counters[_CAPACITY]
        self._data = shm.buf[_HEADER_BYTES : _HEADER_BYTES + self.capacity]
        # Each side caches its own counter; only the other side's is read from shared memory.
        self._head = self._counters[_HEAD]
        self._tail = self._counters[_TAIL]

    @classmethod
    def create(cls, capacity: int = DEFAULT_RING_CAPACITY) -> ByteRing:
        if capacity < 16 or capacity % 8:
            raise ValueError(f"ring capacity must be a multiple of 8 and at least 16 bytes, got {capacity}")
        name = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"
        shm = SharedMemory(name=name, create=True, size=_HEADER_BYTES + capacity)
        shm.buf[:_HEADER_BYTES].cast("Q")[_CAPACITY] = capacity
        return cls(shm, is_owner=True)

    @classmethod
    def attach(cls, name: str) -> ByteRing:
        return cls(SharedMemory(name=name), is_owner=False)

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def max_record_size(self) -> int:
        """The largest payload that fits in an empty ring."""
        return self.capacity - _LENGTH.size

    def check_size(self, payload_len: int) -> None:
        if payload_len > self.max_record_size:
            raise RecordTooLargeError(
                f"record of {payload_len} bytes can never fit in a ring of {self.capacity} bytes "
                f"(max {self.max_record_size})"
            )

    def put_nowait(self, payload: bytes | bytearray | memoryview) -> bool:
        """Append one record; False if there is no room now. RecordTooLargeError if there never will be."""
        size = _record_bytes(len(payload))
        if size > self.capacity:
            self.check_size(len(payload))
        if self.capacity - (self._tail - self._counters[_HEAD]) < size:
            return False
        start = self._tail % self.capacity
        _LENGTH.pack_into(self._data, start, len(payload))
        start += _LENGTH.size
        first = min(len(payload), self.capacity - start)
        src = memoryview(payload)
        self._data[start : start + first] = src[:first]
        if first < len(payload):  # wrap: the rest of the payload goes to the start of the data area
            self._data[: len(payload) - first] = src[first:]
        self._tail += size
        self._counters[_TAIL] = self._tail  # publish after the payload is written
        return True

    def get_all(self) -> list[bytes]:
        """Remove and return every record published so far, oldest first."""
        tail = self._counters[_TAIL]
        records = []
        head = self._head
        while head < tail:
            start = head % self.capacity
            (length,) = _LENGTH.unpack_from(self._data, start)
            if length > self.max_record_size:
                raise RuntimeError(f"ring {self.name} is corrupt: record length {length} at offset {start}")
            start += _LENGTH.size
            end = start + length
            if end <= self.capacity:
                records.append(bytes(self._data[start:end]))
            else:
                records.append(bytes(self._data[start:]) + bytes(self._data[: end - self.capacity]))
            head += _record_bytes(length)
        self._head = head
        self._counters[_HEAD] = head  # publish after the records are copied out
        return records

    def is_empty(self) -> bool:
        """For the consumer: no published record is waiting."""
        return self._counters[_TAIL] == self._head

    def close(self) -> None:
        """Detach (the owner also unlinks). Idempotent."""
        if self._data is None:
            return
        # Release every view of shm.buf first, or SharedMemory.close() raises BufferError.
        self._counters.release()
        self._data.release()
        self._data = None
        self._shm.close()
        if self._is_owner:
            self._shm.unlink()


class Wakeup:
    """A level-triggered wake-up fd: the producer signals after each put, the consumer clears before draining.

    An eventfd where the OS has one (a single fd for both ends), else a pipe. Both are non-blocking.
    """

    def __init__(self, read_fd: int, write_fd: int, is_eventfd: bool) -> None:
        self.read_fd = read_fd  # -1 in a process that only signals
        self.write_fd = write_fd  # -1 in a process that only waits
        self.is_eventfd = is_eventfd

    @classmethod
    def create(cls, kind: str = "auto") -> Wakeup:
        """kind: "eventfd", "pipe", or "auto" (eventfd when available)."""
        if kind not in ("auto", "eventfd", "pipe"):
            raise ValueError(f"unknown wake-up kind {kind!r}")
        if kind != "pipe" and hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            return cls(fd, fd, is_eventfd=True)
        if kind == "eventfd":
            raise OSError("os.eventfd is not available on this platform")
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        return cls(read_fd, write_fd, is_eventfd=False)

    def signal(self) -> None:
        try:
            if self.is_eventfd:
                os.eventfd_write(self.write_fd, 1)
            else:
                os.write(self.write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of unread signals: the consumer is already due to wake up

    def clear(self) -> None:
        try:
            if self.is_eventfd:
                os.eventfd_read(self.read_fd)
            else:
                while os.read(self.read_fd, 4096):
                    pass
        except BlockingIOError:
            pass  # nothing pending: already clear

    def wait(self, timeout: float | None) -> bool:
        """Block until signalled (True) or `timeout` seconds pass (False). Does not clear."""
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))

    def fds(self) -> list[int]:
        return sorted({fd for fd in (self.read_fd, self.write_fd) if fd >= 0})

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)
        self.read_fd = self.write_fd = -1


class Channel:
    """One process's end of a channel pair: `send` on the outbound ring, `recv_all` from the inbound one.

    `fileno()` is the inbound wake-up fd: block on it with `wait`, `select`, or `loop.add_reader`; it becomes
    readable after the peer sends. A reader must call `recv_all` (which clears it) before waiting again.
    """

    def __init__(
        self,
        outbound: ByteRing,
        outbound_wakeup: Wakeup,
        inbound: ByteRing,
        inbound_wakeup: Wakeup,
        extra_fds: tuple[int, ...] = (),
    ) -> None:
        self._outbound = outbound
        self._outbound_wakeup = outbound_wakeup
        self._inbound = inbound
        self._inbound_wakeup = inbound_wakeup
        self._extra_fds = list(extra_fds)  # the child's pipe ends, held by the parent until close
        self.is_closed = False

    @property
    def max_record_size(self) -> int:
        return self._outbound.max_record_size

    def try_send(self, data: bytes) -> bool:
        """Send one record without waiting; False when the outbound ring is full. Never blocks."""
        if not self._outbound.put_nowait(data):
            return False
        self._outbound_wakeup.signal()
        return True

    def send(self, data: bytes, timeout: float | None = None) -> None:
        """Send one record, waiting for room while the ring is full (never drops).

        RecordTooLargeError at once for a record that can never fit; TimeoutError after `timeout` seconds.
        The wait is a short sleep back-off (≤ 1 ms): a full ring is rare and means the consumer is behind.
        """
        self._outbound.check_size(len(data))
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0
        while not self.try_send(data):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"ring {self._outbound.name} stayed full for {timeout} s")
            time.sleep(delay)
            delay = min(max(2 * delay, 20e-6), _MAX_BACKOFF_S)

    def recv_all(self) -> list[bytes]:
        """Every record the peer has sent so far (maybe none). Clears the wake-up first, so none is missed."""
        self._inbound_wakeup.clear()
        return self._inbound.get_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the peer has sent something (True) or the timeout passes (False)."""
        return not self._inbound.is_empty() or self._inbound_wakeup.wait(timeout)

    def fileno(self) -> int:
        return self._inbound_wakeup.read_fd

    def close(self) -> None:
        """Release the rings (unlinking them in the owner) and the fds. Idempotent."""
        if self.is_closed:
            return
        self.is_closed = True
        self._outbound.close()
        self._inbound.close()
        fds = {*self._outbound_wakeup.fds(), *self._inbound_wakeup.fds(), *self._extra_fds}
        for fd in sorted(fds):
            os.close(fd)


@dataclass(frozen=True)
class ChannelHandles:
    """What a child needs to attach to a channel pair, as seen from the child. Picklable into any child.

    The fds cross a spawn through `multiprocessing.reduction.DupFd` (inherited via pass_fds while the Process
    is being started; through the resource sharer otherwise).
    """

    send_ring: str
    send_fd: int  # wake-up fd the child signals after sending
    recv_ring: str
    recv_fd: int  # wake-up fd the child waits on
    is_eventfd: bool

    def __reduce__(self) -> tuple:
        dup_send, dup_recv = reduction.DupFd(self.send_fd), reduction.DupFd(self.recv_fd)
        return _rebuild_handles, (self.send_ring, dup_send, self.recv_ring, dup_recv, self.is_eventfd)

    def attach(self) -> Channel:
        """The child's Channel. It does not own the segments: closing it only detaches."""
        return Channel(
            outbound=ByteRing.attach(self.send_ring),
            outbound_wakeup=Wakeup(-1, self.send_fd, self.is_eventfd),
            inbound=ByteRing.attach(self.recv_ring),
            inbound_wakeup=Wakeup(self.recv_fd, -1, self.is_eventfd),
        )


def _rebuild_handles(send_ring: str, dup_send, recv_ring: str, dup_recv, is_eventfd: bool) -> ChannelHandles:
    return ChannelHandles(send_ring, dup_send.detach(), recv_ring, dup_recv.detach(), is_eventfd)


def create_channel_pair(
    capacity: int = DEFAULT_RING_CAPACITY, wakeup: str = "auto"
) -> tuple[Channel, ChannelHandles]:
    """Create both rings and wake-ups. Returns the parent's Channel (the owner) and the child's handles."""
    rings: list[ByteRing] = []
    wakeups: list[Wakeup] = []
    try:
        for _ in range(2):
            rings.append(ByteRing.create(capacity))
            wakeups.append(Wakeup.create(wakeup))
    except BaseException:
        for ring in rings:
            ring.close()
        for w in wakeups:
            w.close()
        raise
    (to_child, to_child_wakeup), (to_parent, to_parent_wakeup) = zip(rings, wakeups, strict=True)
    handles = ChannelHandles(
        send_ring=to_parent.name,
        send_fd=to_parent_wakeup.write_fd,
        recv_ring=to_child.name,
        recv_fd=to_child_wakeup.read_fd,
        is_eventfd=to_child_wakeup.is_eventfd,
    )
    parent = Channel(
        outbound=to_child,
        outbound_wakeup=Wakeup(-1, to_child_wakeup.write_fd, to_child_wakeup.is_eventfd),
        inbound=to_parent,
        inbound_wakeup=Wakeup(to_parent_wakeup.read_fd, -1, to_parent_wakeup.is_eventfd),
        extra_fds=(handles.send_fd, handles.recv_fd),
    )
    return parent, handles
