"""The scale-out settings against the real PostgreSQL and Redis of the machine (skipped where absent)."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/15"

pytestmark = pytest.mark.services


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(extra)
    return env


def _run(code_or_args, env):
    args = code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args]
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def postgres_db():
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    name = f"csp_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgres://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def redis_url():
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    return REDIS_URL


def test_postgresql_migrates_and_imports_the_sample_data(postgres_db, tmp_path):
    env = _env(DATABASE_URL=postgres_db, CSP_DATA_DIR=str(tmp_path))
    migrate = _run(["manage.py", "migrate", "--no-input", "-v0"], env)
    assert migrate.returncode == 0, migrate.stderr
    imported = _run(["manage.py", "import_qa", "data/train.json", "--status", "approved"], env)
    assert imported.returncode == 0, imported.stderr
    count = _run(
        "import django; django.setup(); from knowledge.models import QAPair; "
        "print(QAPair.objects.filter(status='approved').count())",
        {**env, "DJANGO_SETTINGS_MODULE": "csplatform.settings"},
    )
    assert count.stdout.strip() == "113", count.stderr


def test_redis_url_switches_channel_layer_queue_broker_and_cache(redis_url, tmp_path):
    code = """
import django; django.setup()
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.cache import cache
from django_q.brokers import get_broker

layer = get_channel_layer()
print(type(layer).__name__)
channel = async_to_sync(layer.new_channel)()
async_to_sync(layer.send)(channel, {"type": "ping", "n": 7})
print(async_to_sync(layer.receive)(channel)["n"])
cache.set("csp-test", "ok", 10); print(cache.get("csp-test"))
broker = get_broker(); print(type(broker).__name__, broker.ping())
"""
    result = _run(code, _env(REDIS_URL=redis_url, CSP_DATA_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="csplatform.settings"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["RedisChannelLayer", "7", "ok", "Redis", "True"]
