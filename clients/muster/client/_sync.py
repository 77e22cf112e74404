"""A synchronous facade for applications that are not asyncio: the async client on a private loop thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from muster.client._cluster import Cluster
from muster.client._config import ClientConfig
from muster.client._models import Event, Node, Progress, Resync
from muster.client._watch import ClusterView, ConnectionState, NodeChange, Watch

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="muster-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class SyncCluster:
    """The client for code that is not asyncio: every :class:`Cluster` method, blocking.

    ``with SyncCluster.connect("127.0.0.1:7400") as cluster: cluster.list_nodes()``. Calls run on a
    private event loop in a daemon thread; callbacks (view changes, state changes) run on that thread.
    """

    def __init__(self, config: ClientConfig) -> None:
        self._thread = _LoopThread()
        self._cluster: Cluster = self._thread.run(self._make(config))

    @staticmethod
    async def _make(config: ClientConfig) -> Cluster:
        return Cluster(config)

    @classmethod
    def connect(
        cls, address: str | Sequence[str] | None = None, *, config: ClientConfig | None = None, **options: Any
    ) -> SyncCluster:
        """Connects; the arguments are those of :meth:`Cluster.connect`."""
        from muster.client._config import default_address, split_addresses

        if config is None:
            config = ClientConfig(addresses=split_addresses(address or default_address()), **options)
        return cls(config)

    def __enter__(self) -> SyncCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channels and stops the loop thread."""
        self._thread.run(self._cluster.close())
        self._thread.stop()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        attr = getattr(self._cluster, name)
        if not callable(attr) or not asyncio.iscoroutinefunction(attr):
            return attr  # type: ignore[no-any-return]

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._thread.run(attr(*args, **kwargs))

        call.__doc__ = attr.__doc__
        return call

    def watch(self, start_revision: int = 0, **options: Any) -> SyncWatch:
        """A blocking iterator over events (see :class:`Watch`)."""
        watch = self._thread.run(self._new_watch(start_revision, options))
        return SyncWatch(self._thread, watch)

    async def _new_watch(self, start_revision: int, options: dict[str, Any]) -> Watch:
        return Watch(self._cluster, start_revision=start_revision, **options)

    @contextlib.contextmanager
    def lock(self, name: str, **options: Any) -> Iterator[Any]:
        """``with cluster.lock("name", ttl=..., wait=...) as lease:`` for code that is not asyncio.

        The lease is renewed on the client's loop thread. A thread cannot be cancelled, so the body
        must call ``lease.ensure_held()`` before each guarded write (and fence its writes with
        ``lease.token``); LockLostError comes out of the ``with`` if the lease was lost.
        """
        held = self._cluster.lock(name, **options)
        lease = self._thread.run(held.__aenter__())
        try:
            yield lease
        except BaseException as exc:
            self._thread.run(held.__aexit__(type(exc), exc, exc.__traceback__))
            raise
        else:
            self._thread.run(held.__aexit__(None, None, None))

    def view(self) -> SyncClusterView:
        """A live view (see :class:`ClusterView`), following until closed."""
        view = self._thread.run(self._new_view())
        return SyncClusterView(self._thread, view)

    async def _new_view(self) -> ClusterView:
        view = ClusterView(self._cluster)
        await view.start()
        return view


class SyncWatch:
    """Blocking iteration over a :class:`Watch`."""

    def __init__(self, thread: _LoopThread, watch: Watch) -> None:
        self._thread = thread
        self._watch = watch

    def __iter__(self) -> Iterator[Resync | Event | Progress]:
        return self

    def __next__(self) -> Resync | Event | Progress:
        return self._thread.run(self._watch.__anext__())

    def next(self, timeout: float) -> Resync | Event | Progress:
        """The next item, or TimeoutError after ``timeout`` seconds (the stream stays open)."""
        fut = asyncio.run_coroutine_threadsafe(self._watch.__anext__(), self._thread.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    @property
    def state(self) -> ConnectionState:
        """The connection state."""
        return self._watch.state

    def close(self) -> None:
        """Ends the stream."""
        self._thread.loop.call_soon_threadsafe(self._watch.close)

    def __enter__(self) -> SyncWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncClusterView:
    """A :class:`ClusterView` for code that is not asyncio."""

    def __init__(self, thread: _LoopThread, view: ClusterView) -> None:
        self._thread = thread
        self._view = view

    @property
    def nodes(self) -> Mapping[int, Node]:
        """A snapshot copy of the nodes by id."""
        return dict(self._view.nodes)

    @property
    def state(self) -> ConnectionState:
        """The stream's connection state."""
        return self._view.state

    def on_change(self, callback: Callable[[NodeChange], None]) -> None:
        """``callback(change)`` for every change (called on the client's loop thread)."""
        self._view.on_change(callback)

    def wait_until(self, predicate: Callable[[Mapping[int, Node]], bool], timeout: float = 30.0) -> None:
        """Blocks until ``predicate(nodes)`` holds."""
        self._thread.run(self._view.wait_until(predicate, timeout))

    def close(self) -> None:
        """Stops following."""
        self._thread.run(self._view.stop())

    def __enter__(self) -> SyncClusterView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
