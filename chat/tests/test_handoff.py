"""Human handoff: the state machine, and every transition reaching the customer's websocket live."""

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from chat import handoff
from chat.models import Conversation, Message
from chat.services import ChatError
from csplatform.asgi import application

pytestmark = pytest.mark.services

ORIGIN = [(b"origin", b"http://localhost")]
State = Conversation.State
EVENTS = ("request", "take", "reply", "release", "close")
# The whole table: (state, event) -> the state after it, or None where it is refused.
EXPECTED = {
    (State.BOT, "request"): State.WAITING,
    (State.BOT, "take"): State.AGENT,
    (State.BOT, "close"): State.CLOSED,
    (State.WAITING, "take"): State.AGENT,
    (State.WAITING, "reply"): State.AGENT,
    (State.WAITING, "release"): State.BOT,
    (State.WAITING, "close"): State.CLOSED,
    (State.AGENT, "take"): State.AGENT,
    (State.AGENT, "reply"): State.AGENT,
    (State.AGENT, "release"): State.BOT,
    (State.AGENT, "close"): State.CLOSED,
}


def _apply(event, conversation, agent):
    if event == "request":
        return handoff.handoff_request(conversation=conversation)
    if event == "reply":
        handoff.handoff_reply(conversation=conversation, agent=agent, text="您好，我是客服小王。")
        return Conversation.objects.get(pk=conversation.pk)
    return getattr(handoff, f"handoff_{event}")(conversation=conversation, agent=agent)


@pytest.mark.django_db
@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", EVENTS)
def test_every_transition_and_every_refusal(state, event, staff_user):
    conversation = Conversation.objects.create(session_key="s", state=state)
    expected = EXPECTED.get((state, event))
    if expected is None:
        with pytest.raises(handoff.HandoffRefused) as refused:
            _apply(event, conversation, staff_user)
        assert refused.value.code == "invalid_state"
        conversation.refresh_from_db()
        assert conversation.state == state and not conversation.messages.exists()  # nothing changed
        return
    after = _apply(event, conversation, staff_user)
    assert after.state == expected
    if expected == State.AGENT:
        assert after.agent == staff_user
    if event == "request":
        assert after.handoff_requested_at is not None
    if expected == State.CLOSED:
        assert after.closed_at is not None
    if event == "reply":
        reply = after.messages.get()
        assert (reply.role, reply.sent_by, reply.text) == (Message.Role.AGENT, staff_user, "您好，我是客服小王。")


@pytest.mark.django_db
def test_satisfaction_is_rated_once_after_closing():
    conversation = Conversation.objects.create(session_key="s")
    with pytest.raises(handoff.HandoffRefused):
        handoff.conversation_rate(conversation=conversation, rating=5)
    conversation.state = State.CLOSED
    conversation.save()
    for bad in (0, 6, "5", True, 4.5):
        with pytest.raises(ChatError):
            handoff.conversation_rate(conversation=conversation, rating=bad)
    assert handoff.conversation_rate(conversation=conversation, rating=4).csat == 4
    with pytest.raises(ChatError):
        handoff.conversation_rate(conversation=conversation, rating=5)


@pytest.mark.django_db
def test_keywords_ask_for_a_person(settings):
    settings.CSP_HANDOFF_KEYWORDS = ["人工", "human agent"]
    assert handoff.asks_for_a_person("我要转人工") and handoff.asks_for_a_person("Can I talk to a Human Agent?")
    assert not handoff.asks_for_a_person("如何退货？")
    assert handoff.route_customer_message(text="如何退货？", session_key="s") is None  # the assistant answers
    assert not Conversation.objects.exists()  # and nothing was stored for it here
    conversation, message = handoff.route_customer_message(text="转人工", session_key="s")
    assert conversation.state == State.WAITING and message.role == Message.Role.USER and message.text == "转人工"


def _session():
    """A saved browser session; its cookie lets two sockets be the same customer (a reconnect)."""
    from django.contrib.sessions.backends.db import SessionStore

    store = SessionStore()
    store.create()
    return [(b"cookie", f"sessionid={store.session_key}".encode())]


async def _connect(cookie=()):
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=ORIGIN + list(cookie))
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def _frames_until(communicator, kind, timeout=30):
    """Frames received up to and including the first of type `kind`."""
    frames = []
    while True:
        frame = await communicator.receive_json_from(timeout=timeout)
        frames.append(frame)
        if frame["type"] == kind:
            return frames


@pytest.mark.django_db(transaction=True)
def test_a_handoff_through_the_websocket_from_button_to_rating(serving, faq, staff_user):
    cookie = _session()

    async def scenario():
        customer = await _connect(cookie)
        await customer.send_json_to({"type": "handoff", "conversation": None})
        waiting = await customer.receive_json_from(timeout=10)
        conversation_id = waiting["conversation"]
        conversation = await Conversation.objects.aget(pk=conversation_id)

        # While waiting, messages are stored for the agent and the assistant stays silent.
        await customer.send_json_to({"type": "message", "text": faq[0]["instruction"], "conversation": conversation_id})
        received = await _frames_until(customer, "handoff")

        # A staff reply (the admin calls the same service) reaches the open socket live.
        reply = await database_sync_to_async(handoff.handoff_reply)(conversation=conversation, agent=staff_user, text="您好，我是客服小王。")
        live = [await customer.receive_json_from(timeout=10) for _ in range(2)]

        # A second socket of the same customer (a reconnect) follows the conversation again.
        again = await _connect(cookie)
        await again.send_json_to({"type": "join", "conversation": conversation_id})
        joined = await again.receive_json_from(timeout=10)
        await again.disconnect()

        await database_sync_to_async(handoff.handoff_release)(conversation=conversation, agent=staff_user)
        released = await customer.receive_json_from(timeout=10)
        await customer.send_json_to({"type": "message", "text": faq[1]["instruction"], "conversation": conversation_id})
        answered = await _frames_until(customer, "done")

        await database_sync_to_async(handoff.handoff_close)(conversation=conversation, agent=staff_user)
        closed = await customer.receive_json_from(timeout=10)
        await customer.send_json_to({"type": "message", "text": "还在吗？", "conversation": conversation_id})
        after_close = await customer.receive_json_from(timeout=10)
        await customer.send_json_to({"type": "rate", "conversation": conversation_id, "rating": 5})
        rated = await customer.receive_json_from(timeout=10)
        await customer.disconnect()
        return waiting, received, reply, live, joined, released, answered, closed, after_close, rated

    waiting, received, reply, live, joined, released, answered, closed, after_close, rated = asyncio.run(scenario())
    assert waiting["type"] == "handoff" and waiting["state"] == "waiting"
    assert [f["type"] for f in received] == ["received", "handoff"] and received[1]["state"] == "waiting"
    assert live == [{"type": "handoff", "state": "agent"}, {"type": "agent", "text": "您好，我是客服小王。", "message": reply.pk}]
    assert joined == {"type": "handoff", "state": "agent", "conversation": waiting["conversation"]}
    assert released == {"type": "handoff", "state": "bot"}
    assert answered[0]["type"] == "start" and answered[-1]["type"] == "done"
    streamed = "".join(f["text"] for f in answered if f["type"] == "token")
    assert streamed and answered[0]["adapter"] == "v1"  # the assistant answers again (multi-turn: not the memorised text)
    assert closed == {"type": "handoff", "state": "closed"}
    assert after_close["type"] == "error" and after_close["code"] == "closed"
    assert rated == {"type": "rated", "conversation": waiting["conversation"], "rating": 5}
    messages = list(Message.objects.filter(conversation_id=waiting["conversation"]).values_list("role", "text"))
    assert messages[:2] == [("user", faq[0]["instruction"]), ("agent", "您好，我是客服小王。")]  # no bot answer while waiting
    assert messages[2:] == [("user", faq[1]["instruction"]), ("assistant", streamed)]
    assert Conversation.objects.get(pk=waiting["conversation"]).csat == 5


@pytest.mark.django_db(transaction=True)
def test_a_keyword_in_a_message_asks_for_a_person_and_others_cannot_follow_it(settings):
    settings.CSP_HANDOFF_KEYWORDS = ["人工"]

    async def scenario():
        customer = await _connect()
        await customer.send_json_to({"type": "message", "text": "我要人工客服", "conversation": None})
        frames = await _frames_until(customer, "handoff")
        stranger = await _connect()  # another browser session
        await stranger.send_json_to({"type": "join", "conversation": frames[0]["conversation"]})
        refused = await stranger.receive_json_from(timeout=10)
        await stranger.send_json_to({"type": "handoff", "conversation": frames[0]["conversation"]})
        refused_too = await stranger.receive_json_from(timeout=10)
        await customer.send_json_to({"type": "handoff", "conversation": frames[0]["conversation"]})
        twice = await customer.receive_json_from(timeout=10)
        await stranger.disconnect()
        await customer.disconnect()
        return frames, refused, refused_too, twice

    frames, refused, refused_too, twice = asyncio.run(scenario())
    assert [f["type"] for f in frames] == ["received", "handoff"] and frames[1]["state"] == "waiting"
    assert refused["type"] == refused_too["type"] == "error" and refused["code"] == refused_too["code"] == "not_found"
    assert twice["state"] == "waiting"  # asking again is not an error
    assert Conversation.objects.get().state == State.WAITING


@pytest.mark.django_db
def test_staff_work_a_handoff_from_the_admin(staff_client, staff_user):
    from django.urls import reverse

    from knowledge.models import QAPair

    bot = Conversation.objects.create(session_key="b", title="普通会话")
    conversation = Conversation.objects.create(session_key="s", title="要找人工")
    Message.objects.create(conversation=conversation, role="user", text="用户问：发票怎么开？")
    handoff.handoff_request(conversation=conversation)

    changelist = staff_client.get(reverse("admin:chat_conversation_changelist"))
    html = changelist.content.decode()
    assert 'id="waiting-banner"' in html  # on every admin page, with the count
    assert list(changelist.context["cl"].result_list)[0] == conversation  # waiting ones first
    assert bot in changelist.context["cl"].result_list

    url = reverse("admin:chat_conversation_handoff", args=[conversation.pk])
    assert "用户问：发票怎么开？" in staff_client.get(url).content.decode()
    staff_client.post(url, {"reply": "1", "text": "在订单详情页点“申请发票”即可。"})
    conversation.refresh_from_db()
    assert conversation.state == "agent" and conversation.agent == staff_user
    reply = conversation.messages.get(role="agent")

    staff_client.post(url, {"draft": str(reply.pk)})
    pair = QAPair.objects.get(drafted_from=reply)
    assert (pair.instruction, pair.output, pair.source, pair.status) == (
        "用户问：发票怎么开？", "在订单详情页点“申请发票”即可。", "handoff", "draft"
    )
    staff_client.post(url, {"release": "1"})
    conversation.refresh_from_db()
    assert conversation.state == "bot"
    refused = staff_client.post(url, {"release": "1"}, follow=True)  # not possible from bot: said, nothing changes
    assert any(m.level_tag == "error" for m in refused.context["messages"])
    staff_client.post(url, {"close": "1"})
    conversation.refresh_from_db()
    assert conversation.state == "closed"
    assert 'id="waiting-banner"' not in staff_client.get(reverse("admin:index")).content.decode()


@pytest.mark.django_db
def test_staff_without_the_change_permission_can_read_but_not_act(staff_client, staff_user):
    from django.contrib.auth.models import Permission
    from django.urls import reverse

    staff_user.user_permissions.remove(Permission.objects.get(codename="change_conversation"))
    conversation = Conversation.objects.create(session_key="s", state=State.WAITING)
    url = reverse("admin:chat_conversation_handoff", args=[conversation.pk])
    assert staff_client.get(url).status_code == 200
    assert staff_client.post(url, {"reply": "1", "text": "hi"}).status_code == 403
    conversation.refresh_from_db()
    assert conversation.state == State.WAITING and not conversation.messages.exists()


@pytest.mark.django_db
def test_staff_flag_answers_into_the_review_queue(staff_client):
    from django.urls import reverse

    from chat.models import ReviewItem

    conversation = Conversation.objects.create(session_key="s")
    question = Message.objects.create(conversation=conversation, role="user", text="用户问：几点发货？")
    answer = Message.objects.create(conversation=conversation, role="assistant", text="不知道。")
    staff_client.post(
        reverse("admin:chat_message_changelist"),
        {"action": "flag_for_review", "_selected_action": [answer.pk, question.pk]},
    )
    assert list(ReviewItem.objects.all()) == [answer]


@pytest.mark.django_db
def test_rest_clients_reach_a_person_too(customer_api, staff_user, settings):
    settings.CSP_HANDOFF_KEYWORDS = ["人工"]
    asked = customer_api.post("/api/v1/chat/", {"text": "转人工"}, format="json")
    assert asked.status_code == 202 and asked.json()["state"] == "waiting"
    conversation = Conversation.objects.get(pk=asked.json()["conversation"])
    more = customer_api.post("/api/v1/chat/", {"text": "订单号 123", "conversation": str(conversation.pk)}, format="json")
    assert more.status_code == 202 and not conversation.messages.filter(role="assistant").exists()
    handoff.handoff_reply(conversation=conversation, agent=staff_user, text="收到，马上处理。")
    shown = customer_api.get(f"/api/v1/chat/conversations/{conversation.pk}/").json()
    assert [m["role"] for m in shown["messages"]] == ["user", "user", "agent"]
    handoff.handoff_close(conversation=conversation, agent=staff_user)
    closed = customer_api.post("/api/v1/chat/", {"text": "还在吗", "conversation": str(conversation.pk)}, format="json")
    assert closed.status_code == 409 and closed.json()["code"] == "closed"
