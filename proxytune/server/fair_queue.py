"""The server's waiting requests, taken in turn from each client: a client with 60 requests waiting and one
with 1 each get the next free slot in alternation, not first come first served.

A client is whatever the handler names it (OpenAI's `user` field, else the peer's address). Within a client,
requests keep their order; `appendleft` puts a request back at the very front (a scored echo request that now
waits for a decoding slot). The scheduler also caps what one client may have waiting (half the queue), so a
client that floods cannot fill the queue and turn everyone else away.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterator


class FairQueue:
    def __init__(self):
        self.clients: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self.clients.values())

    def __iter__(self) -> Iterator:
        for jobs in list(self.clients.values()):
            yield from list(jobs)

    def waiting(self, client: str) -> int:
        return len(self.clients.get(client, ()))

    def append(self, job) -> None:
        self.clients.setdefault(job.client, collections.deque()).append(job)

    def appendleft(self, job) -> None:
        self.clients.setdefault(job.client, collections.deque()).appendleft(job)
        self.clients.move_to_end(job.client, last=False)

    def peek(self):
        """The next job to serve: the first of the client whose turn it is."""
        return next(iter(self.clients.values()))[0]

    def pop(self, job) -> None:
        """Take `job` (from `peek`) out; its client's turn passes to the next client."""
        jobs = self.clients[job.client]
        jobs.remove(job)
        if jobs:
            self.clients.move_to_end(job.client)
        else:
            del self.clients[job.client]

    def remove(self, predicate: Callable) -> list:
        """Take out every job for which predicate(job) holds; returns them."""
        removed = []
        for client in list(self.clients):
            kept = collections.deque()
            for job in self.clients[client]:
                (removed if predicate(job) else kept).append(job)
            if kept:
                self.clients[client] = kept
            else:
                del self.clients[client]
        return removed
