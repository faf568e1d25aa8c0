"""A replica's models: a model that fails to load never evicts a healthy one from the replica's
multiplexed cache, and is not retried until `model_retry_s` has passed. Ray's cache (modelled
here as it behaves: evict the least recently used, then call the loader) is driven through
`_Models.runtime` exactly as the deployments drive it."""

import asyncio
import time
from collections import OrderedDict

import pytest

from latentforge.serve.app import _Models, _unavailable
from latentforge.serve.codec import BadInput
from latentforge.serve.config import ServeConfig


class RayLikeCache:
    """@serve.multiplexed's order of work: evict the LRU model first (calling its __del__), then load."""

    def __init__(self, loader, capacity: int):
        self.loader, self.capacity, self.models = loader, capacity, OrderedDict()

    async def __call__(self, model_id: str):
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        if len(self.models) >= self.capacity:
            _, evicted = self.models.popitem(last=False)
            if hasattr(evicted, "__del__"):
                evicted.__del__()
        self.models[model_id] = self.loader(model_id)
        return self.models[model_id]


class Runtime:
    def __init__(self, name):
        self.name = name


@pytest.fixture
def models(monkeypatch):
    m = _Models(ServeConfig(model_retry_s=60))
    m.load_calls = []

    def load(model_id):
        m.load_calls.append(model_id)
        if model_id.startswith("broken"):
            m.failed[model_id] = time.monotonic()
            raise _unavailable(model_id, 60)
        return Runtime(model_id)

    monkeypatch.setattr(m, "load", load)
    return m


def test_a_failing_model_evicts_no_healthy_one_and_is_not_retried(models):
    cache = RayLikeCache(models.take, capacity=2)

    async def scenario():
        a = await models.runtime("a", cache)
        b = await models.runtime("b", cache)
        assert (a.name, b.name) == ("a", "b") and set(cache.models) == {"a", "b"} == models.resident
        with pytest.raises(BadInput) as e:
            await models.runtime("broken", cache)
        assert e.value.status == 503
        assert set(cache.models) == {"a", "b"}  # nothing was evicted for it
        with pytest.raises(BadInput, match="tried again in"):
            await models.runtime("broken", cache)  # the negative cache answers; no second load
        assert models.load_calls == ["a", "b", "broken"]
        assert (await models.runtime("a", cache)) is a and models.load_calls.count("a") == 1  # still resident
        c = await models.runtime("c", cache)  # a healthy newcomer evicts the least recently used (b)
        assert c.name == "c" and set(cache.models) == {"a", "c"} == models.resident
        again = await asyncio.gather(*(models.runtime("d", cache) for _ in range(4)))
        assert len({id(r) for r in again}) == 1 and models.load_calls.count("d") == 1  # loaded once

    asyncio.run(scenario())
