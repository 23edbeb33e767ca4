"""Live world servers per scenario, kept across episodes, their warm verifier workers, and the
threads that use them."""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from echo_jax.awm.live_world import WORLD_FAILURES, LiveWorld
from echo_jax.awm.warm_verifier import VerifierPool
from echo_jax.awm.world_format import World

log = logging.getLogger(__name__)


class WorldPool:
    """Live servers per scenario, started on first use and kept until `close`, and the threads
    that run episodes on them. The threads live as long as the pool: a server gets SIGKILL when
    the thread that started it ends (PR_SET_PDEATHSIG follows the parent thread). `verifiers`
    holds the scenarios' warm verifier workers, closed with the pool."""

    def __init__(self, worlds: dict[str, World], threads: int, per_scenario: int = 2):
        self.worlds = worlds
        self.per_scenario = per_scenario
        self.idle: dict[str, list[LiveWorld]] = collections.defaultdict(list)
        self.count: collections.Counter[str] = collections.Counter()
        self.cond = threading.Condition()
        self.threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="episode")
        self.started = 0  # Servers started (restarts included).
        self.verifiers = VerifierPool()

    def acquire(self, scenario: str) -> LiveWorld:
        with self.cond:
            while not self.idle[scenario] and self.count[scenario] >= self.per_scenario:
                self.cond.wait()
            if self.idle[scenario]:
                return self.idle[scenario].pop()
            self.count[scenario] += 1
        live = LiveWorld(self.worlds[scenario])
        try:
            live.open()
        except BaseException:
            with self.cond:
                self.count[scenario] -= 1
                self.cond.notify_all()
            raise
        self.started += 1
        return live

    def prestart(self, scenarios) -> None:
        """Starts a server for each scenario in the pool's threads, returning at once, so that
        the starts overlap whatever the caller does next (loading a model). A start that fails
        is left to the first episode of its scenario, which starts it again and reports."""

        def start(scenario: str) -> None:
            try:
                self.release(self.acquire(scenario))
            except WORLD_FAILURES as error:
                log.warning("%s: prestart failed (%s); its first episode retries", scenario, error)

        for scenario in dict.fromkeys(scenarios):
            self.threads.submit(start, scenario)

    def release(self, live: LiveWorld) -> None:
        with self.cond:
            self.idle[live.world.name].append(live)
            self.cond.notify_all()

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        for lives in self.idle.values():
            for live in lives:
                live.close()
        self.idle.clear()
        self.count.clear()
        self.verifiers.close()
