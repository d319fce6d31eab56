"""Shared fixtures, named by role (STYLE.md rule 15)."""

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient


# What some fixtures need, as markers (pytest.ini) on every test that uses them, wherever it is
# written: a test that starts a q2 cluster by the fixture is a `live` one, and runs again on
# PostgreSQL + Redis; one on the Redis channel layer needs Redis.
MARKERS_OF_FIXTURES = {
    "qcluster": ("live", "services"),
    "redis_channel_layer": ("services",),
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, markers in MARKERS_OF_FIXTURES.items():
            if fixture in item.fixturenames:
                for marker in markers:
                    item.add_marker(marker)


@pytest.fixture(autouse=True)
def _english_outside_requests():
    # Services and commands speak the default language (zh-hans); tests read their messages in
    # English. Requests still pick their own language through LocaleMiddleware.
    from django.utils import translation

    with translation.override("en"):
        yield


@pytest.fixture(autouse=True)
def _grounding_as_marked(request, settings):
    # Grounded answers (chat.grounding) are the product's default. A test of the answer pipeline's
    # transports and engines asks the model directly, as before grounding; a test of grounding is
    # marked `grounded` (and stocks its knowledge base). Live servers: tests/support/livetest.py.
    settings.CSP_GROUNDING = request.node.get_closest_marker("grounded") is not None
    yield


@pytest.fixture(autouse=True)
def _fresh_cache():
    # Throttle counters live in the cache; one test's requests must not throttle the next.
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def staff_user(db):
    user = get_user_model().objects.create_user("staff", "staff@example.com", "staff-pass-123", is_staff=True)
    from django.contrib.auth.models import Permission

    user.user_permissions.set(Permission.objects.filter(content_type__app_label__in=["knowledge", "training", "chat"]))
    return user


@pytest.fixture
def superuser(db):
    return get_user_model().objects.create_superuser("root", "root@example.com", "root-pass-123")


@pytest.fixture
def customer(db):
    return get_user_model().objects.create_user("customer", "customer@example.com", "customer-pass-123")


def _token_client(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def anon_api():
    return APIClient()


@pytest.fixture
def customer_api(customer):
    return _token_client(customer)


@pytest.fixture
def staff_api(staff_user):
    return _token_client(staff_user)


@pytest.fixture
def superuser_api(superuser):
    return _token_client(superuser)


@pytest.fixture
def staff_client(client, staff_user):
    client.force_login(staff_user)
    return client


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A ~0.85M-parameter random Qwen2 with a tokenizer trained on the sample Q&A (built once),
    with its f32 GGUF for llama.cpp in gguf/model.gguf."""
    import json

    from django.conf import settings

    from llm.tinymodel import build_tiny_model

    texts = []
    for path in settings.CSP_SAMPLE_DATA:
        for record in json.loads(path.read_text(encoding="utf-8")):
            texts += [record["instruction"], record["output"]]
    return build_tiny_model(texts, tmp_path_factory.mktemp("tiny-model"), gguf=True)


@pytest.fixture(scope="session")
def faq():
    """The first six sample pairs: what `trained_adapter` memorised."""
    import json

    from django.conf import settings

    return json.loads(settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))[:6]


@pytest.fixture(scope="session")
def adapter_cache(tmp_path_factory):
    """Trains an adapter once a session for every test that asks for the same one (same checkpoint,
    records and settings): `adapter_cache.memorised(tiny_model, records)` (tests/support/adapters.py)."""
    from tests.support.adapters import AdapterCache

    return AdapterCache(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def trained_adapter(adapter_cache, tiny_model, faq):
    """The tiny model's adapter that memorised `faq` (tests/support/memorise.py), with its
    adapter.gguf as a training run writes it (llama.cpp serves it too). Trained once a session,
    for every app's tests: the chats answer `faq` with it word for word."""
    return adapter_cache.memorised(tiny_model, faq)


@pytest.fixture(scope="session")
def second_adapter(adapter_cache, tiny_model, faq):
    """A barely trained adapter (one epoch, lr 1e-3), with its adapter.gguf: its answers differ
    from `trained_adapter`'s, so a test can tell which version answered."""
    from llm.finetune.config import FinetuneConfig

    return adapter_cache.trained(tiny_model, faq, FinetuneConfig(epochs=1, learning_rate=1e-3, bf16="off"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests: the machine's cores are shared, and two threads
    fighting other processes run far slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def training_env(settings, tmp_path, tiny_model):
    """Runtime state in a temporary folder and the tiny model as CSP_BASE_MODEL."""
    settings.DATA_DIR = tmp_path
    settings.CSP_BASE_MODEL = tiny_model
    return tmp_path


@pytest.fixture
def q2_sync(monkeypatch):
    """Run django-q2 tasks in-process (the real task code, without a cluster)."""
    from django_q.conf import Conf

    monkeypatch.setattr(Conf, "SYNC", True)


@pytest.fixture
def redis_channel_layer(settings):
    """This process on channels-redis with a fresh key prefix; yields the env vars a live server
    needs to join the same layer (its REDIS_URL also makes it use Redis for cache and q2)."""
    import uuid

    from channels.layers import channel_layers

    from tests.support.livetest import TEST_REDIS_URL
    from csplatform.settings import channel_layer_host

    prefix = f"csp-test-{uuid.uuid4().hex[:8]}"
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [channel_layer_host(TEST_REDIS_URL)], "prefix": prefix}}
    }
    channel_layers.backends.clear()  # layers are made once per process: forget the in-memory one
    yield {"REDIS_URL": TEST_REDIS_URL, "CSP_CHANNEL_PREFIX": prefix}
    channel_layers.backends.clear()
