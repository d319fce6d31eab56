"""Deeply nested JSON is refused with a clear 400 / error everywhere JSON comes in (issue #16
item 4): request bodies, import files (JSON, JSONL) and websocket frames. Before, Python's json
module raised RecursionError past ~1 000 levels: a 500 on the API and the import."""

import asyncio
import json

import pytest
from channels.testing import WebsocketCommunicator
from django.core.files.uploadedfile import SimpleUploadedFile

from csplatform.asgi import application
from csplatform.parsers import MAX_JSON_DEPTH, JSONNestingError, loads_json
from knowledge import services
from knowledge.models import Category, QAPair


def nested(depth, leaf="1"):
    return "[" * depth + leaf + "]" * depth


NESTING = f"more than {MAX_JSON_DEPTH} levels deep"


def test_json_up_to_the_limit_parses_and_one_level_more_is_refused_before_any_recursion():
    assert loads_json(nested(MAX_JSON_DEPTH)) is not None
    with pytest.raises(JSONNestingError, match=NESTING):
        loads_json(nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(JSONNestingError):
        loads_json("[" * 1_000_000)  # unclosed: counted, never handed to the recursive parser


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = json.dumps({"instruction": "[" * 5000, "output": '\\"{' * 5000})
    assert loads_json(text) == json.loads(text)


@pytest.mark.django_db
def test_a_deep_category_body_is_a_400_that_says_why(staff_api):
    body = '{"name": ' + nested(1000, '"x"') + "}"
    response = staff_api.post("/api/v1/categories/", body, content_type="application/json", HTTP_ACCEPT_LANGUAGE="en")
    assert response.status_code == 400 and NESTING in response.json()["detail"]
    assert not Category.objects.exists()


@pytest.mark.django_db
def test_a_deep_chat_body_from_a_customer_is_a_400_that_says_why(customer_api):
    body = '{"text": "hi", "conversation": ' + nested(5000, "null") + "}"
    response = customer_api.post("/api/v1/chat/", body, content_type="application/json", HTTP_ACCEPT_LANGUAGE="en")
    assert response.status_code == 400 and NESTING in response.json()["detail"]


@pytest.mark.django_db
def test_a_json_import_file_nested_2000_deep_is_a_file_error(staff_api):
    content = nested(2000, '{"instruction": "q", "output": "a"}').encode()
    report = services.qa_import(content=content, filename="deep.json")
    assert NESTING in report.file_error and not report.committed

    upload = SimpleUploadedFile("deep.json", content, content_type="application/json")
    response = staff_api.post("/api/v1/qa-pairs/import/", {"file": upload}, format="multipart", HTTP_ACCEPT_LANGUAGE="en")
    assert response.status_code == 400 and NESTING in response.json()["file_error"]
    assert not QAPair.objects.exists()


@pytest.mark.django_db
def test_a_jsonl_line_nested_3000_deep_is_a_rejected_row_named_by_its_line():
    good = json.dumps({"instruction": "如何退货？", "output": "7天无理由退货。"}, ensure_ascii=False)
    content = "\n".join([good, '{"instruction": "q", "output": ' + nested(3000, '"a"') + "}", good]).encode()
    report = services.qa_import(content=content, filename="deep.jsonl")
    rejected = [row for row in report.rows if row.action == "rejected"]
    assert [row.row for row in rejected] == [2] and NESTING in rejected[0].errors["row"][0]
    assert not report.committed and not QAPair.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_deep_websocket_frame_gets_an_error_frame_and_the_socket_stays_open():
    async def scenario():
        communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://localhost")])
        connected, _ = await communicator.connect()
        assert connected
        await communicator.send_to(text_data=nested(1000))
        frame = await communicator.receive_json_from(timeout=10)
        await communicator.send_to(text_data='{"type": "dance"}')
        again = await communicator.receive_json_from(timeout=10)
        await communicator.disconnect()
        return frame, again

    frame, again = asyncio.run(scenario())
    # The socket speaks the site's language (zh-hans by default): the limit is in every translation.
    assert frame["type"] == "error" and frame["code"] == "invalid" and str(MAX_JSON_DEPTH) in frame["detail"]
    assert again["type"] == "error" and again["code"] == "invalid"
