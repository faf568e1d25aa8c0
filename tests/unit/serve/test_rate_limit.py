"""Per-client rate limiting in front of the API (`limits.rate_per_s`): a token bucket per client
address per gateway replica, a 429 with Retry-After past it, before any body is read."""

import asyncio

from latentforge.serve.app import PUBLIC_PATHS, RateLimit, TokenBuckets


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_a_bucket_allows_its_burst_then_its_rate_and_forgets_the_idlest_client():
    clock = Clock()
    b = TokenBuckets(rate=2.0, burst=3, max_clients=2, clock=clock)
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("a") == 0.5  # empty: one token comes back in 1/rate s
    clock.t += 0.5
    assert b.take("a") == 0.0 and b.take("a") > 0
    assert b.take("b") == 0.0  # another client has its own bucket
    b.take("c")  # a third: the idlest ("a") is forgotten, so a flood of addresses stays bounded
    assert list(b.buckets) == ["b", "c"]


def _call(app, path="/v1/models/gan/generate", client=("10.0.0.1", 5000), headers=()):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": list(headers), "client": client}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"])


def test_past_its_rate_a_client_gets_429_with_retry_after_and_others_are_served(monkeypatch):
    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    clock = Clock()
    monkeypatch.setattr(RateLimit, "buckets", TokenBuckets(rate=0.5, burst=2, clock=clock))
    monkeypatch.setattr(RateLimit, "trust_forwarded_for", False)
    app = RateLimit(inner)
    assert [_call(app)[0] for _ in range(2)] == [200, 200]
    status, headers = _call(app)
    assert status == 429 and headers[b"retry-after"] == b"2" and len(reached) == 2  # never reached the app
    assert _call(app, client=("10.0.0.2", 5000))[0] == 200
    assert all(_call(app, path=p)[0] == 200 for p in PUBLIC_PATHS)  # liveness and the page are never limited
    # X-Forwarded-For is anyone's to send: it counts only where the operator trusts the proxy
    spoof = [(b"x-forwarded-for", b"1.2.3.4")]
    assert _call(app, headers=spoof)[0] == 429
    monkeypatch.setattr(RateLimit, "trust_forwarded_for", True)
    assert _call(app, headers=spoof)[0] == 200
    clock.t += 4.0  # two tokens back
    assert _call(app)[0] == 200
