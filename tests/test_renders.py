"""RenderCache: large registry reads are rendered once per version, never on the loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sidecar.api.renders import RenderCache

LARGE = 50_000


class Renders:
    """A render function that counts its calls and notes the thread it ran on."""

    def __init__(self, body: bytes = b"[]", *, fail: bool = False) -> None:
        self.calls = 0
        self.threads: set[int] = set()
        self.body, self.fail = body, fail

    def __call__(self) -> bytes:
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.fail:
            raise ValueError("cannot render")
        return self.body


async def test_a_large_read_renders_off_the_event_loop():
    render = Renders()
    assert await RenderCache().get(1, "/api/v1/rules", LARGE, render) == b"[]"
    assert threading.get_ident() not in render.threads


async def test_a_small_read_renders_in_place():
    render = Renders()
    await RenderCache().get(1, "/api/v1/rules", 10, render)
    assert render.threads == {threading.get_ident()}


async def test_concurrent_reads_share_one_render_and_later_ones_reuse_it():
    cache, render = RenderCache(), Renders()
    bodies = await asyncio.gather(*(cache.get(1, "/r", LARGE, render) for _ in range(20)))
    await cache.get(1, "/r", LARGE, render)
    assert (render.calls, set(bodies)) == (1, {b"[]"})


async def test_each_version_and_query_renders_anew():
    cache, render = RenderCache(), Renders()
    await cache.get(1, "/r", LARGE, render)
    await cache.get(1, "/r?tag=x", LARGE, render)
    await cache.get(2, "/r", LARGE, render)
    assert render.calls == 3


async def test_answers_over_the_byte_budget_are_not_kept():
    cache, render = RenderCache(max_bytes=10), Renders(b"x" * 11)
    await cache.get(1, "/r", LARGE, render)
    await cache.get(1, "/r", LARGE, render)
    assert render.calls == 2


async def test_a_failed_render_raises_and_is_not_kept():
    cache = RenderCache()
    with pytest.raises(ValueError, match="cannot render"):
        await cache.get(1, "/r", LARGE, Renders(fail=True))
    render = Renders()
    assert await cache.get(1, "/r", LARGE, render) == b"[]"
