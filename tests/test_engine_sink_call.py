"""The engine's sink calls from the event loop: a cancel never leaves one running behind it."""

import asyncio
import threading

import pytest

from nilus_dagster.engine.table import sink_call


def test_a_sink_call_returns_its_result_and_raises_its_error():
    def fail() -> None:
        raise ValueError("the sink's own error")

    async def main() -> None:
        assert await sink_call(divmod, 7, 2) == (3, 1)
        with pytest.raises(ValueError, match="own error"):
            await sink_call(fail)

    asyncio.run(main())


def test_a_cancelled_sink_call_ends_only_after_the_call_did_even_when_cancelled_twice():
    # The caller goes on to report or close the sink after a cancel: the call must be over.
    release, ended = threading.Event(), threading.Event()

    def slow() -> int:
        release.wait(10)
        ended.set()
        return 7

    async def main() -> None:
        task = asyncio.ensure_future(sink_call(slow))
        await asyncio.sleep(0.05)
        for _ in range(2):
            task.cancel()
            await asyncio.sleep(0.1)
            assert not task.done() and not ended.is_set()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended.is_set()

    asyncio.run(main())
