"""Throttles are shared across web processes: two daphnes on one Redis cache count together."""

import urllib.error
import urllib.request

import pytest
import redis
from rest_framework.authtoken.models import Token

from tests.support.livetest import TEST_REDIS_URL, live_daphne

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.live, pytest.mark.services]


def _get(url, key, path="/api/v1/chat/conversations/", scheme="Token"):
    request = urllib.request.Request(f"{url}{path}", headers={"Authorization": f"{scheme} {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, None
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Retry-After")


def test_two_processes_share_one_rate_limit(customer, tmp_path):
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()  # this test's own Redis database: no counts from earlier runs
    key = Token.objects.create(user=customer).key
    env = {"REDIS_URL": TEST_REDIS_URL, "CSP_API_THROTTLE_USER": "6/min", "CSP_DATA_DIR": str(tmp_path)}
    with live_daphne(env=env, log=tmp_path / "a.log") as first, live_daphne(env=env, log=tmp_path / "b.log") as second:
        statuses = [_get(url, key) for url in (first, second) * 3]  # 6 requests, alternating processes
        refused, retry_after = _get(first, key)
        also_refused, _ = _get(second, key)
        # The OpenAI-compatible API goes through the same throttles, on the same shared count.
        openai_refused = [_get(url, key, "/v1/models", "Bearer")[0] for url in (first, second)]
    assert [status for status, _ in statuses] == [200] * 6
    assert (refused, also_refused) == (429, 429)  # each process alone has seen only 3 or 4
    assert retry_after is not None and int(retry_after) > 0
    assert openai_refused == [429, 429]
