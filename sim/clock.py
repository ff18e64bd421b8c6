"""The simulated clock: a compressed day that moves in ticks, held back by the system.

Every actor of the simulation is an asyncio task (an "agent") that does a few requests and
then waits for a simulated time. The clock moves on while agents are at work, but never
more than `window_s` of simulated time past the oldest agent still at work: the day does
not run ahead of what the system has answered, and the actions of one stretch of the day
go to the services together. At full speed the day goes as fast as the services allow;
with `speed` it goes no faster than that many simulated seconds per wall second.

An agent that waits for the system rather than for the day (a trip the consumers have not
opened yet) waits on the wall clock and stays at work meanwhile: the day waits for the
system's consumers as it waits for its answers.

Agents are essential (an arrival, a trip under way, a lab result to come: the day is not
over while one is pending) or daemons (an idle crew, the dispatcher's fleet board, a
hospital's load reports). When only daemons wait, the clock paces itself at `idle_speed`,
so that what the services do on their own wall clock (the recurring-care scheduler) gets
wall time to happen before the simulated day runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Task = asyncio.Task[None]


class Clock:
    def __init__(self, start: datetime, *, tick_s: float = 20.0, window_s: float = 900.0,
                 speed: float | None = None, idle_speed: float = 600.0) -> None:
        self.start, self.tick_s, self.speed, self.idle_speed = start, tick_s, speed, idle_speed
        self.window = max(0, math.floor(window_s / tick_s))
        self.k = 0  # the current tick
        self._heap: list[tuple[int, int, bool, asyncio.Future[None], Task]] = []
        self._essential_waiting = 0
        self._seq = itertools.count()
        self._tasks: dict[Task, bool] = {}  # every agent -> essential
        self._running: dict[Task, int] = {}  # agents at work -> the tick they started at
        self._changed = asyncio.Event()
        self._last_wall = time.monotonic()
        self.errors: list[str] = []
        self.left_over: list[str] = []  # the essential agents the deadline cut short

    @property
    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.k * self.tick_s)

    def tick_of(self, t: datetime) -> int:
        return math.floor((t - self.start).total_seconds() / self.tick_s)

    @property
    def essential_agents(self) -> int:
        return sum(1 for essential in self._tasks.values() if essential)

    def holding(self) -> list[str]:
        """The essential agents still alive: what keeps the day from ending."""
        return sorted(t.get_name() for t, essential in self._tasks.items() if essential)

    # -- agents -----------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None], *, essential: bool = True,
              name: str | None = None) -> Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = essential
        self._at_work(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: Task) -> None:
        self._tasks.pop(task, None)
        self._waiting(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.errors.append(f"{task.get_name()}: {type(exc).__name__}: {exc}")

    def _at_work(self, task: Task) -> None:
        self._running[task] = self.k
        self._changed.set()

    def _waiting(self, task: Task) -> None:
        self._running.pop(task, None)
        self._changed.set()

    # -- waiting ----------------------------------------------------------------------

    async def until(self, t: datetime, *, essential: bool = True) -> datetime:
        """Wait for simulated time `t` (at once if the clock is past it); returns `t`."""
        k = self.tick_of(t)
        if k <= self.k:
            return t
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = _current()
        heapq.heappush(self._heap, (k, next(self._seq), essential, fut, task))
        self._essential_waiting += int(essential)
        await self._block(fut, task)
        return t

    async def sleep(self, seconds: float, *, essential: bool = True) -> datetime:
        return await self.until(self.now + timedelta(seconds=seconds), essential=essential)

    async def _block(self, fut: asyncio.Future[None], task: Task) -> None:
        self._waiting(task)
        await fut  # whoever wakes it puts the task back at work

    def _wake(self, fut: asyncio.Future[None], task: Task) -> None:
        if not fut.done():
            fut.set_result(None)
            self._at_work(task)

    # -- the scheduler ----------------------------------------------------------------

    async def run(self, finished: Callable[[], bool], deadline: datetime,
                  on_tick: Callable[[], None] | None = None) -> bool:
        """Advance until `finished()` (checked when no agent is at work) or the deadline;
        True when finished. Agents still waiting are cancelled at the end."""
        try:
            while True:
                self._changed.clear()
                oldest = min(self._running.values(), default=None)
                if oldest is None and finished():
                    return True
                if not self._heap:
                    if oldest is None:
                        return finished()
                    await self._changed.wait()
                    continue
                k_next = max(self.k + 1, self._heap[0][0])
                if oldest is not None and k_next > oldest + self.window:
                    await self._changed.wait()  # the day waits for the system
                    continue
                if self.start + timedelta(seconds=k_next * self.tick_s) > deadline:
                    return False
                await self._pace(k_next)
                self.k = k_next
                while self._heap and self._heap[0][0] <= self.k:
                    _, _, essential, fut, task = heapq.heappop(self._heap)
                    self._essential_waiting -= int(essential)
                    self._wake(fut, task)
                if on_tick is not None:
                    on_tick()
                await asyncio.sleep(0)  # let the woken agents start before looking again
        finally:
            self.left_over = self.holding()
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _pace(self, k_next: int) -> None:
        """No faster than the speed in force since the last tick; a slow stretch is not
        made up for afterwards (the day goes at the slower of the speed and the system)."""
        speed = self.speed or math.inf
        if not self._essential_waiting:
            speed = min(speed, self.idle_speed)
        if math.isfinite(speed):
            wait = self._last_wall + (k_next - self.k) * self.tick_s / speed - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        self._last_wall = time.monotonic()


def _current() -> Task:
    task = asyncio.current_task()
    assert task is not None, "the clock is used from agents (tasks)"
    return task


class Inbox(Generic[T]):
    """Messages for one agent; waiting on an empty inbox does not hold the clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.items: deque[T] = deque()
        self._waiter: tuple[asyncio.Future[None], Task] | None = None

    def put(self, item: T) -> None:
        self.items.append(item)
        if self._waiter is not None:
            self.clock._wake(*self._waiter)
            self._waiter = None

    async def get(self) -> T:
        while not self.items:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiter = (fut, _current())
            await self.clock._block(*self._waiter)
        return self.items.popleft()

    def __len__(self) -> int:
        return len(self.items)
