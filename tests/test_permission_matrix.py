"""The permission matrix: every API operation × {anonymous, customer token, staff, superuser}.

Operations come from the OpenAPI schema (every path and method the API has), plus the
OpenAI-compatible routes that live outside it. Path ids are real rows (the customer owns the
conversation and the answer). Expected: anonymous callers get no 2xx anywhere but the public
schema and docs; a customer's token gets no 2xx outside the chat; nobody ever gets a 5xx.
"""

import re

import pytest
from drf_spectacular.generators import SchemaGenerator
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from chat.models import Conversation, Message
from knowledge.tests.factories import make_category, make_pair
from training.models import AdapterVersion, BaseModel, DatasetSnapshot, TrainingRun

pytestmark = [pytest.mark.django_db, pytest.mark.services]

PUBLIC = ("/api/schema/",)
CUSTOMER_OK = ("/api/v1/chat/",)  # the customer's own chat, conversations and ratings
EXTRA = [("/v1/models", "get"), ("/v1/chat/completions", "post")]


def _operations():
    schema = SchemaGenerator().get_schema(request=None, public=True)
    operations = [(path, method) for path, item in schema["paths"].items() for method in item if method != "parameters"]
    return operations + EXTRA


@pytest.fixture
def rows(customer, tmp_path):
    category = make_category()
    pair = make_pair(category=category)
    base = BaseModel.objects.create(name="tiny", path=str(tmp_path))
    snapshot = DatasetSnapshot.objects.create(sha256="0" * 64, path=str(tmp_path), train_count=1, dev_count=0)
    run = TrainingRun.objects.create(base_model=base, snapshot=snapshot, status="failed")
    version = AdapterVersion.objects.create(name="v1", run=run, base_model=base, path=str(tmp_path / "v1"))
    conversation = Conversation.objects.create(user=customer, channel="api")
    Message.objects.create(conversation=conversation, role="user", text="你好")
    answer = Message.objects.create(conversation=conversation, role="assistant", text="您好", rating=-1)
    return {
        "qa-pairs": pair.pk, "categories": category.pk, "training-runs": run.pk, "adapter-versions": version.pk,
        "conversations": conversation.pk, "messages": answer.pk, "review-queue": answer.pk,
    }


def _url(path, rows):
    def fill(match):
        segment = path[: match.start()].rstrip("/").rsplit("/", 1)[-1]
        return str(rows.get(segment, 1))

    return re.sub(r"\{[^}]+\}", fill, path)


def _clients(customer, staff_user, superuser):
    """{role: (client, headers for the OpenAI-compatible routes, which take a Bearer key)}."""
    clients = {"anonymous": (APIClient(), {})}
    for role, user in (("customer", customer), ("staff", staff_user), ("superuser", superuser)):
        key = Token.objects.create(user=user).key
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
        clients[role] = (client, {"HTTP_AUTHORIZATION": f"Bearer {key}"})
    return clients


def test_no_unexpected_2xx_and_no_5xx_for_any_role(rows, customer, staff_user, superuser, training_env, settings):
    settings.CSP_API_THROTTLE_RATES = {**settings.CSP_API_THROTTLE_RATES, "anon": "100000/min", "user": "100000/min"}
    clients = _clients(customer, staff_user, superuser)
    operations = _operations()
    assert len(operations) > 30
    unexpected, server_errors, seen = [], [], set()
    # Writes by staff can delete rows; anonymous and customers go first, on the intact rows.
    for role in ("anonymous", "customer", "staff", "superuser"):
        client, bearer = clients[role]
        for path, method in operations:
            url = _url(path, rows)
            response = getattr(client, method)(url, {}, format="json", **(bearer if path.startswith("/v1/") else {}))
            seen.add((path, method))
            code = response.status_code
            if code >= 500:
                server_errors.append((role, method.upper(), url, code))
            ok = 200 <= code < 300
            if role == "anonymous" and ok and not path.startswith(PUBLIC):
                unexpected.append((role, method.upper(), url, code))
            if role == "customer" and ok and not path.startswith(CUSTOMER_OK + PUBLIC + ("/v1/",)):
                unexpected.append((role, method.upper(), url, code))
    assert server_errors == []
    assert unexpected == []
    assert len(seen) == len(operations)
