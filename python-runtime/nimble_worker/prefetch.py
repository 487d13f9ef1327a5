"""Batches of the steps ahead, loaded on a background thread (config `prefetch`).

The replica names each step's batches by a key (step, shares, micro-batch size) and
schedules the keys it expects next. A step whose key was scheduled takes those batches;
any other key drops everything scheduled, and that step loads on the training thread as
it would without prefetch. An error while loading is raised where the training thread
takes that batch, as it was raised. The thread runs only while there is work: it starts
when a batch is scheduled and ends once none has come for IDLE_S, so it outlives its work
by at most that. At the interpreter's exit every loading thread is ended first (torch
aborts the process if one is mid-operation then); the worker itself leaves by os._exit.
It runs the task's dataset and collate code, never at the same time as the training
thread does: `drop` and `settle` wait for it before the training thread loads anything
itself.
"""

from __future__ import annotations

import atexit
import random
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, wait
from typing import Any, Callable, Hashable, Sequence

import torch

IDLE_S = 1.0
"""How long the loading thread waits for more work before it ends (steps come faster)."""


class Prefetcher:
    def __init__(self, load: Callable[[Any], Any]):
        self.load = load
        """Makes one batch from one part (on the loading thread)."""
        self._ahead: dict[Hashable, list[Future]] = {}
        """Scheduled keys in order, each with its batches to come."""
        self._queue: deque[tuple[Future, Any]] = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.hits = 0
        """Keys taken as scheduled."""
        self.misses = 0
        """Keys that were not scheduled (loaded on the training thread)."""
        self.cpu_s = 0.0
        """CPU seconds the loading thread has spent loading."""

    def scheduled(self, key: Hashable) -> bool:
        return key in self._ahead

    def schedule(self, key: Hashable, parts: Sequence[Any]) -> bool:
        """Load each of `parts`, in order, as the batches of `key`. False if no thread could
        be started (the process's thread limit): nothing is then scheduled."""
        futures = [Future() for _ in parts]
        with self._lock:
            if self._closed:
                return False
            self._queue.extend(zip(futures, parts))
            self._work.notify()
            if futures and self._thread is None:
                thread = threading.Thread(target=self._drain, name="nimble-prefetch", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # can't start new thread
                    self._queue.clear()
                    return False
                self._thread = thread
                _live.add(self)
        self._ahead[key] = futures
        return True

    def take(self, key: Hashable) -> list[Future] | None:
        """The batches scheduled for `key` (keys scheduled before it are dropped), or None
        when it was not scheduled: everything scheduled is then dropped."""
        if key not in self._ahead:
            self.misses += 1
            self.drop()
            return None
        self.hits += 1
        for k in list(self._ahead):
            futures = self._ahead.pop(k)
            if k == key:
                return futures
            _cancel(futures)
        raise AssertionError("unreachable")

    def drop(self) -> None:
        """Forget everything scheduled; returns once no batch is being loaded."""
        futures = [f for fs in self._ahead.values() for f in fs]
        self._ahead.clear()
        _cancel(futures)
        wait(futures)  # the one being loaded, if any, finishes

    def settle(self) -> None:
        """Returns once every scheduled batch is loaded (and kept)."""
        wait([f for fs in self._ahead.values() for f in fs])

    def close(self) -> None:
        """Drop everything scheduled and end the loading thread; nothing is scheduled after."""
        self.drop()
        with self._lock:
            self._closed = True
            self._work.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._work.wait_for(lambda: self._queue or self._closed, timeout=IDLE_S) \
                        or self._closed:
                    self._thread = None
                    return
                future, part = self._queue.popleft()
            if future.set_running_or_notify_cancel():  # False: dropped meanwhile
                cpu0 = time.thread_time()
                try:
                    batch, error = self.load(part), None
                except BaseException as err:  # noqa: BLE001 - raised where the batch is taken
                    batch, error = None, err
                self.cpu_s += time.thread_time() - cpu0  # counted before the batch is taken
                if error is None:
                    future.set_result(batch)
                else:
                    future.set_exception(error)


_live: weakref.WeakSet[Prefetcher] = weakref.WeakSet()
"""Prefetchers that have started a loading thread."""


@atexit.register
def _close_all() -> None:
    for prefetcher in list(_live):
        prefetcher.close()


def _cancel(futures: Sequence[Future]) -> None:
    for f in futures:
        f.cancel()


def global_rng_states() -> tuple:
    """The global generators a loading thread would share with the training thread: torch's
    default CPU generator, Python's `random` and numpy's legacy one (when imported)."""
    np = sys.modules.get("numpy")
    state = np.random.get_state() if np is not None else None
    return (bytes(torch.random.get_rng_state().tolist()), random.getstate(),
            None if state is None else (state[0], state[1].tobytes(), *state[2:]))
