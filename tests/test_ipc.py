"""engine/ipc.py: the shared-memory ring, its wake-ups, and channel pairs across a real spawned process."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import struct
import sys
import time
from pathlib import Path

import pytest

from engine.ipc import SHM_PREFIX, ByteRing, ChannelHandles, RecordTooLargeError, create_channel_pair

SPAWN = multiprocessing.get_context("spawn")
WAKEUP_KINDS = ["eventfd", "pipe"] if hasattr(os, "eventfd") else ["pipe"]


def _shm_names() -> set[str]:
    """Rings this test process created (other servers may run on the machine at the same time)."""
    return {p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}{os.getpid()}_*")}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    before = _shm_names()
    yield
    assert _shm_names() - before == set()


def _payload(seq: int) -> bytes:
    """A record whose length and content depend on its sequence number (0..59 bytes of filler)."""
    return struct.pack("<I", seq) + bytes([seq % 251]) * (seq * 7 % 60)


# ---- child process targets (module level: spawn imports this module) ----------------------------------------


def _produce(handles: ChannelHandles, count: int) -> None:
    """Exits 3 if the ring was never full: then the test would not have tested back-pressure."""
    channel = handles.attach()
    num_full = 0
    for seq in range(count):
        if not channel.try_send(_payload(seq)):
            num_full += 1
            channel.send(_payload(seq), timeout=30)
    channel.close()
    sys.exit(0 if num_full else 3)


def _echo(handles: ChannelHandles) -> None:
    channel = handles.attach()
    try:
        while True:
            channel.wait(5.0)
            for record in channel.recv_all():
                if record == b"quit":
                    return
                channel.send(record)
    finally:
        channel.close()


def _attach_and_exit(handles: ChannelHandles) -> None:
    handles.attach().close()


# ---- the ring alone ----------------------------------------------------------------------------------------


def test_record_straddling_the_end_wraps_to_the_start() -> None:
    writer = ByteRing.create(32)
    reader = ByteRing.attach(writer.name)
    try:
        assert writer.put_nowait(b"a" * 16)  # 4 + 16 -> 24 bytes; tail at 24
        assert reader.get_all() == [b"a" * 16]
        # length word at 24..28, payload 28..32 then 0..6: split in two
        assert writer.put_nowait(b"0123456789")
        assert reader.get_all() == [b"0123456789"]
        assert writer.put_nowait(b"")
        assert reader.get_all() == [b""]
    finally:
        reader.close()
        writer.close()


def test_many_wraps_keep_order_and_content() -> None:
    writer = ByteRing.create(128)
    reader = ByteRing.attach(writer.name)
    try:
        sent, received = 0, []
        while sent < 2000:
            while sent < 2000 and writer.put_nowait(_payload(sent)):
                sent += 1
            received += reader.get_all()
        received += reader.get_all()
        assert received == [_payload(i) for i in range(2000)]
        assert reader.is_empty()
    finally:
        reader.close()
        writer.close()


def test_full_ring_refuses_and_oversized_record_fails_at_once() -> None:
    ring = ByteRing.create(64)
    try:
        assert ring.max_record_size == 60
        assert ring.put_nowait(b"x" * 28)  # 32 bytes
        assert ring.put_nowait(b"y" * 28)  # 64: full
        assert not ring.put_nowait(b"")
        with pytest.raises(RecordTooLargeError):
            ring.put_nowait(b"z" * 61)
        assert ring.get_all() == [b"x" * 28, b"y" * 28]
        assert ring.put_nowait(b"z" * 60)  # exactly the whole ring
        assert ring.get_all() == [b"z" * 60]
    finally:
        ring.close()


def test_send_of_oversized_record_raises_instead_of_blocking() -> None:
    parent, _ = create_channel_pair(capacity=64)
    try:
        with pytest.raises(RecordTooLargeError, match="never fit"):
            parent.send(b"z" * 100)
        for _ in range(2):
            parent.send(b"x" * 28)
        with pytest.raises(TimeoutError):
            parent.send(b"x", timeout=0.05)  # full and nobody reading
    finally:
        parent.close()


def test_bad_capacity() -> None:
    with pytest.raises(ValueError):
        ByteRing.create(100)  # not a multiple of 8


# ---- channels across a spawned process ---------------------------------------------------------------------


@pytest.mark.parametrize("wakeup", WAKEUP_KINDS)
def test_back_pressure_with_a_slow_consumer_never_drops_or_reorders(wakeup: str) -> None:
    count = 3000
    parent, handles = create_channel_pair(capacity=512, wakeup=wakeup)
    child = SPAWN.Process(target=_produce, args=(handles, count))
    child.start()
    try:
        received: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(received) < count and time.monotonic() < deadline:
            if parent.wait(1.0):
                received += parent.recv_all()
                if len(received) % 7 == 0:
                    time.sleep(0.001)  # slower than the producer: its ring stays full
        child.join(10)
        assert child.exitcode == 0
        assert received == [_payload(i) for i in range(count)]
    finally:
        if child.is_alive():
            child.kill()
        parent.close()


@pytest.mark.parametrize("wakeup", WAKEUP_KINDS)
def test_asyncio_add_reader_wakes_on_every_echo(wakeup: str) -> None:
    parent, handles = create_channel_pair(capacity=4096, wakeup=wakeup)
    child = SPAWN.Process(target=_echo, args=(handles,))
    child.start()

    async def ping_pong() -> list[float]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        loop.add_reader(parent.fileno(), lambda: [inbox.put_nowait(r) for r in parent.recv_all()])
        try:
            round_trips = []
            for seq in range(300):
                start = time.perf_counter()
                parent.send(_payload(seq))
                assert await asyncio.wait_for(inbox.get(), 5) == _payload(seq)
                round_trips.append(time.perf_counter() - start)
            parent.send(b"quit")
            return round_trips
        finally:
            loop.remove_reader(parent.fileno())

    try:
        round_trips = asyncio.run(ping_pong())
        child.join(5)
        assert child.exitcode == 0
        assert len(round_trips) == 300
    finally:
        if child.is_alive():
            child.kill()
        parent.close()


def test_wait_times_out_and_then_sees_a_send() -> None:
    parent, handles = create_channel_pair(capacity=256)
    # In-process attach: duplicate the fds so that each side closes its own.
    child_side = dataclasses.replace(
        handles, send_fd=os.dup(handles.send_fd), recv_fd=os.dup(handles.recv_fd)
    ).attach()
    try:
        assert not child_side.wait(0.02)
        parent.send(b"hi")
        assert child_side.wait(0.5)
        assert child_side.recv_all() == [b"hi"]
        assert child_side.recv_all() == []
        assert not child_side.wait(0.0)
    finally:
        child_side.close()
        parent.close()


def test_segments_exist_while_open_and_are_unlinked_on_close() -> None:
    before = _shm_names()
    parent, handles = create_channel_pair(capacity=256)
    names = {handles.send_ring, handles.recv_ring}
    assert names <= _shm_names() - before
    child = SPAWN.Process(target=_attach_and_exit, args=(handles,))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert names <= _shm_names()  # a child's close detaches only
    parent.close()
    parent.close()  # idempotent
    assert not names & _shm_names()
    with pytest.raises(FileNotFoundError):
        ByteRing.attach(handles.send_ring)


def test_killed_child_leaves_nothing_behind() -> None:
    parent, handles = create_channel_pair(capacity=256)
    child = SPAWN.Process(target=_echo, args=(handles,))
    child.start()
    parent.send(b"ping")
    assert parent.wait(5.0)
    assert parent.recv_all() == [b"ping"]
    child.kill()
    child.join(5)
    parent.close()  # the autouse fixture checks /dev/shm
