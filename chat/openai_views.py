"""The OpenAI-compatible API: POST /v1/chat/completions and GET /v1/models.

Any OpenAI client works against it:

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="<a DRF token key>")
    client.chat.completions.create(model="v3", messages=[{"role": "user", "content": "如何退货？"}])

Stateless, as OpenAI's API is: the conversation is exactly the request's `messages` (system
or developer, user and assistant turns; the last one the user's). Each request is also stored as a
Conversation with channel "openai" for analytics and feedback. The API key is a DRF token
(`Authorization: Bearer <key>`), checked by DRF within the REST API's throttles (OpenAIView).

`model` (required, as OpenAI requires it) picks who answers:

- an adapter version's name ("v3"): that version, active or not (the engine loads an inactive
  one for the request and unloads it after);
- "default" or "csplatform": the ACTIVE version, whichever it is when the request arrives (the
  base model when none is active);
- "base": the base model without any adapter;
- anything else: 404 with code "model_not_found", as OpenAI answers an unknown model.

That is a staff token's choice. A customer's token (not is_staff) reaches what the customers' chat
serves, and nothing else: the aliases, or the active version by its name ("base" while no version
is active); any other version and "base" are "model_not_found" to it, as OpenAI answers a model
the key may not use, and its system messages are dropped (see `scoped_system`).

While a canary rollout runs (training.canary), a request for the active version is a new
conversation as the chat's are, and chat.canary sends the canary's share of them to the canary
version: every customer request, and a staff request for "default" or "csplatform". A staff
request naming a version (the canary's too) gets that version, outside the split. A customer
cannot name the canary: it is tried on a random share, not on request.

The response's `model` names the version that answered ("base" for the base model; the canary's
name for a request the canary answered). GET /v1/models lists what the caller may name: for staff
the active version first ("base" when none is), then every other version, newest first, then
"base"; for a customer the active version alone ("base" when none is).

The answer is chat.answering's, as for the websocket and the REST chat: these views format its
events and map a refusal's code to OpenAI's errors. They are async views, so neither waiting nor
streaming (`stream: true`, Server-Sent Events ending with `data: [DONE]`) holds the event loop or
a thread; when the client goes away Django cancels the view (or closes the stream), and the
answer is cancelled with it. Errors use OpenAI's shape, {"error": {"message", "type", "param",
"code"}}, so its clients raise their usual exceptions.
"""

import logging
import math
import time
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.asgi import ASGIRequest
from django.http import JsonResponse
from django.urls import path
from django.utils.translation import gettext as _
from django.views.decorators.csrf import csrf_exempt
from rest_framework.authentication import TokenAuthentication
from rest_framework.exceptions import APIException, AuthenticationFailed, MethodNotAllowed, NotAuthenticated, Throttled
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView

from chat import answering, grounding
from chat.models import Conversation
from chat.serializers import MAX_CLIENT_TEMPERATURE, sampling_temperature
from csplatform.parsers import JSONNestingError, loads_json
from llm.engine import ERROR, LENGTH, STOP, TIMEOUT, Turn
from llm.engine.events import FILTERED
from training.models import AdapterVersion

logger = logging.getLogger(__name__)

# Any one message longer than this many characters per prompt token cannot fit the prompt, so it
# is refused before tokenising (the rule of EngineConfig.chars_per_token).
CHARS_PER_TOKEN = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# The engine's reasons in OpenAI's words: a time cap cut the answer short, as a length cap does;
# the leak guard's stop is OpenAI's "content_filter" (the text before it stands).
# corrected / fallback: the fact guard replaced a generated answer (the text is the replacement).
FINISH_REASONS = {STOP: "stop", LENGTH: "length", TIMEOUT: "length", FILTERED: "content_filter", "corrected": "stop", "fallback": "stop"}
# `model` names that mean "the active version, whichever it is" (a client need not know its name).
ACTIVE_ALIASES = ("default", "csplatform")
BASE_MODEL_ID = "base"
OWNER = "csplatform"


def error_response(status, message, *, type="invalid_request_error", code=None, param=None, headers=None):
    body = {"error": {"message": str(message), "type": type, "param": param, "code": code}}
    return JsonResponse(body, status=status, headers=headers, json_dumps_params={"ensure_ascii": False})


def unauthorized():
    return error_response(
        401, _("Incorrect or missing API key: send a token key as 'Authorization: Bearer <key>'."), code="invalid_api_key"
    )


def method_not_allowed(allowed):
    return error_response(405, _("Method not allowed; use %(method)s.") % {"method": allowed}, code="method_not_allowed",
                          headers={"Allow": allowed})


def api_error(exc, allowed):
    """DRF's refusal `exc` in OpenAI's error shape, with the codes OpenAI's clients know."""
    if isinstance(exc, (NotAuthenticated, AuthenticationFailed)):
        return unauthorized()
    if isinstance(exc, MethodNotAllowed):
        return method_not_allowed(allowed)
    if isinstance(exc, Throttled):  # the REST API's own rates (CSP_API_THROTTLE_RATES), not a busy engine
        headers = {"Retry-After": str(exc.wait)} if exc.wait else None
        return error_response(429, exc.detail, type="rate_limit_error", code="rate_limit_exceeded", headers=headers)
    return error_response(exc.status_code, exc.detail, code=exc.default_code)


class BearerTokenAuthentication(TokenAuthentication):
    """The REST API's DRF tokens, sent the way OpenAI clients send their API key."""

    keyword = "Bearer"


class OpenAIView(APIView):
    """DRF's authentication, permission and throttle checks in front of an async handler
    `get|post(request, user)`: Bearer tokens, and the REST API's user/anon rates.

    DRF dispatches to sync handlers only, while an answer here is awaited on the event loop (so that
    a client that goes away cancels it). So `as_view` gives Django an async view that runs DRF's
    checks (`initial`, as DRF's own dispatch does) in a thread, then awaits the handler. Refusals
    are answered in OpenAI's error shape.
    """

    authentication_classes = [BearerTokenAuthentication]
    # The answer's form follows the body's `stream`, as OpenAI's does, whatever Accept says.
    renderer_classes = [JSONRenderer]

    @classmethod
    def as_view(cls, **initkwargs):
        allowed = ", ".join(method.upper() for method in cls.http_method_names)

        async def view(request, *args, **kwargs):
            self = cls(**initkwargs)
            self.setup(request, *args, **kwargs)
            try:
                user = await sync_to_async(self.checked_user)(request, *args, **kwargs)
                if request.method.lower() not in self.http_method_names:
                    raise MethodNotAllowed(request.method)
                return await getattr(self, request.method.lower())(request, user)
            except APIException as exc:
                return api_error(exc, allowed)

        return csrf_exempt(view)

    def perform_content_negotiation(self, request, force=False):
        return super().perform_content_negotiation(request, force=True)

    def checked_user(self, request, *args, **kwargs):
        """The authenticated user, within the throttles, or DRF's APIException (sync: reads the database)."""
        self.args, self.kwargs = args, kwargs
        self.request = self.initialize_request(request, *args, **kwargs)
        self.headers = self.default_response_headers
        self.initial(self.request, *args, **kwargs)
        return self.request.user


# --- the request ---


class InvalidRequest(Exception):
    def __init__(self, message, *, param=None, code=None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class CompletionRequest:
    model: str
    turns: list  # Turn(user|assistant, text), ending with the user's
    system: str | None  # the client's system prompt; None keeps the adapter's trained one
    stream: bool
    include_usage: bool
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None


def _whole_number(body, name, minimum, maximum=2**63 - 1):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidRequest(
            _("%(name)s must be a whole number from %(min)s to %(max)s.") % {"name": name, "min": minimum, "max": maximum},
            param=name,
        )
    return value


def _number(body, name, low, high):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(_("%(name)s must be a number from %(low)s to %(high)s.") % {"name": name, "low": low, "high": high},
                             param=name)
    return float(value)


def _content(message, index):
    """A message's text: a string, or a list of text parts (as newer clients send)."""
    content = message.get("content")
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str) or "\x00" in content:  # NUL: no database stores it (PostgreSQL refuses)
        raise InvalidRequest(_("messages[%(i)s].content must be text.") % {"i": index}, param=f"messages[{index}].content")
    limit = CHARS_PER_TOKEN * settings.CSP_CHAT_MAX_INPUT_TOKENS
    if len(content) > limit:
        raise InvalidRequest(
            _("messages[%(i)s] has %(size)s characters; the limit is %(max)s.") % {"i": index, "size": len(content), "max": limit},
            param=f"messages[{index}].content", code="context_length_exceeded",
        )
    return content


def parse_completion_request(body):
    """Check a chat.completions body against the server's caps; raises InvalidRequest."""
    if not isinstance(body, dict):
        raise InvalidRequest(_("The body must be a JSON object."))
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest(
            _('model is required: an adapter version\'s name (see /v1/models), "default" for the active one, or "base".'),
            param="model",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(_("messages must be a non-empty list."), param="messages")
    system, turns = [], []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        role = ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise InvalidRequest(
                _("messages[%(i)s].role must be system, user or assistant.") % {"i": index}, param=f"messages[{index}].role"
            )
        text = _content(message, index)
        if role == "system":
            system.append(text.strip())
        else:
            turns.append(Turn(role, text))
    if not turns or turns[-1].role != "user" or not turns[-1].text.strip():
        raise InvalidRequest(_("The last message must be the user's, and not empty."), param="messages")
    question = turns[-1].text.strip()
    if len(question) > settings.CSP_CHAT_MAX_MESSAGE_CHARS:
        raise InvalidRequest(
            _("The message is %(size)s characters; the limit is %(max)s.")
            % {"size": len(question), "max": settings.CSP_CHAT_MAX_MESSAGE_CHARS},
            param="messages", code="context_length_exceeded",
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(_("stream must be true or false."), param="stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
        raise InvalidRequest(_("stream_options must be an object with a boolean include_usage."), param="stream_options")
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest(_("Only n=1 is supported."), param="n")
    max_tokens = _whole_number(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _whole_number(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 0, MAX_CLIENT_TEMPERATURE)
    top_p = _number(body, "top_p", 0, 1)
    if temperature is not None:
        temperature = sampling_temperature(temperature)
    if top_p == 0:  # a nucleus of no mass is the single likeliest token: greedy
        top_p, temperature = None, 0.0
    return CompletionRequest(
        model=model.strip(),
        # As in the other channels: the most recent CSP_CHAT_HISTORY_MESSAGES turns at most
        # (the engine drops more of the oldest ones if they don't fit the prompt budget).
        turns=turns[-settings.CSP_CHAT_HISTORY_MESSAGES :],
        system="\n\n".join(system) if system else None,
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage")),
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=_whole_number(body, "seed", 0),
    )


# --- the model ---


class UnknownModel(Exception):
    pass


def full_access(user):
    """Whether `user` may pick any version, "base" and the system prompt (staff trying versions
    out), or only what the customers' chat serves. The canary version is not a customer's pick: a
    canary is measured on the share of new conversations chat.canary sends it, and a customer who
    could ask for it would bend that split."""
    return user.is_staff


def pinned_adapter(model, *, everything):
    """The engine's pin for `model`: {} (the current adapter, or the canary's side of it: chat.canary
    routes an unpinned request), {"adapter": None} (the base model) or {"adapter": name,
    "adapter_path": path}; raises UnknownModel, also for a model that exists but is not the active
    one when not `everything` (a customer). A customer naming the active version while a canary runs
    gets {}: its request is routed as the aliases' are. Sync: reads the database."""
    if model in ACTIVE_ALIASES:
        return {}
    if model == BASE_MODEL_ID:
        if everything or not AdapterVersion.objects.filter(is_active=True).exists():
            return {"adapter": None}
        raise UnknownModel(model)
    versions = AdapterVersion.objects.filter(name=model)
    if not everything:
        versions = versions.filter(is_active=True)
    version = versions.values_list("name", "path").first()
    if version is None:
        raise UnknownModel(model)
    if not everything and AdapterVersion.objects.filter(is_canary=True).exists():
        return {}  # what the customers' chat serves: chat.canary sends the request to either side, pinned by name
    # Pinned by name even when it is the active one: an activation while this request is
    # queued must not change who answers a client that asked for this version.
    return {"adapter": version[0], "adapter_path": version[1]}


def model_not_found(model):
    return error_response(
        404,
        _("The model %(model)s does not exist or you do not have access to it: use a name GET /v1/models lists, or \"default\".")
        % {"model": model},
        param="model",
        code="model_not_found",
    )


def scoped_system(system, *, everything):
    """The system prompt a request may set: staff's own, or None (the configured one) for a customer.

    A customer's system messages are dropped, not kept as user text after the configured prompt:
    as user text they would give the customer nothing they cannot type as a question, yet many
    OpenAI clients send a generic one ("You are a helpful assistant.") with every request, and any
    text before the question pulls an adapter trained on single questions off its trained answer
    (measured on the test suite's tiny adapter: "You are a helpful assistant." as a user turn
    before the question, or joined to it, left 0 of 3 memorised answers intact; dropped, 3 of 3).
    """
    return system if everything else None


# --- views ---


def refusal_error(refused, *, model):
    """A question the engine refused (chat.answering's codes) in OpenAI's error shape."""
    if refused.code == "busy":
        return error_response(429, refused.detail, type="rate_limit_error", code="rate_limit_exceeded",
                              headers={"Retry-After": str(refused.retry_after)})
    if refused.code == "too_long":
        return error_response(400, refused.detail, param="messages", code="context_length_exceeded")
    # The operator's problem: CSP_BASE_MODEL or a version's files are missing (or the engine holds a
    # version of that name from another path), or the remote backend (an inference worker, an
    # OpenAI-compatible server) does not answer. The log keeps which.
    logger.error("OpenAI-compatible chat is unavailable (model %s): %s", model, refused.detail)
    return error_response(503, answering.unavailable_detail(), type="server_error", code="model_unavailable")


def not_generated(reason):
    """OpenAI's error for an answer that ended without a finish reason OpenAI has (cancelled, error)
    or without an end at all (unavailable)."""
    message = _("The answer could not be generated (%(reason)s).") % {"reason": reason}
    return {"error": {"message": message, "type": "server_error", "param": None, "code": reason}}


def end_reason(event):
    """The engine's finish reason of the session's last event; "unavailable" when it never ended."""
    if isinstance(event, answering.Failed):
        return event.code
    return event.stats.finish_reason or "unavailable"


def grounding_field(end):
    """The extra `csp` field of a completion: how the answer was grounded (OpenAI clients ignore it)."""
    return {
        "mode": end.mode,
        "sources": grounding.wire_sources(end.sources),
        "used": end.used,
        "finish_reason": end.stats.finish_reason,
        **grounding.offers(end.sources, end.mode),
    }


def usage(stats):
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.tokens,
        "total_tokens": stats.prompt_tokens + stats.tokens,
    }


def chunk_renderer(completion, include_usage):
    """The session's events as chat.completion.chunk Server-Sent Events, ending with data: [DONE]."""

    def chunk(delta, finish_reason=None):
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return answering.sse({**completion, "object": "chat.completion.chunk", "choices": [choice]})

    def render(event):
        if isinstance(event, answering.Started):
            return [chunk({"role": "assistant", "content": ""})]
        if isinstance(event, answering.Text):
            return [chunk({"content": event.text})]
        if isinstance(event, answering.Replaced):
            # A stream only appends: the replacement follows what was shown, on a line of its own,
            # and the final chunk's `csp` says so (the non-streamed answer is the replacement alone).
            return [chunk({"content": "\n\n" + event.text})]
        reason = end_reason(event)
        # The status line is sent already: an answer that was not generated is said in the stream, as OpenAI does.
        if reason in FINISH_REASONS:
            last = {**completion, "object": "chat.completion.chunk", "csp": grounding_field(event)}
            last["choices"] = [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": FINISH_REASONS[reason]}]
            frames = [answering.sse(last)]
        else:
            frames = [answering.sse(not_generated(reason))]
        if include_usage:
            frames.append(answering.sse({**completion, "object": "chat.completion.chunk", "choices": [], "usage": usage(event.stats)}))
        return [*frames, answering.sse("[DONE]")]

    return render


class ChatCompletionsView(OpenAIView):
    http_method_names = ["post"]

    async def post(self, request, user):
        try:
            params = parse_completion_request(loads_json(request.body))
        except RequestDataTooBig:
            return error_response(413, _("The request body is too large."), code="request_too_large")
        except JSONNestingError as exc:  # "[[[[...": json.loads' RecursionError was a 500
            return error_response(400, exc, code="invalid_json")
        except ValueError:
            return error_response(400, _("The body is not valid JSON."), code="invalid_json")
        except InvalidRequest as exc:
            return error_response(400, exc, param=exc.param, code=exc.code)
        everything = full_access(user)
        try:
            pin = await sync_to_async(pinned_adapter)(params.model, everything=everything)
        except UnknownModel:
            return model_not_found(params.model)
        try:
            session = await answering.answer_astart(
                channel=Conversation.Channel.OPENAI,
                turns=params.turns,
                user=user,
                system=scoped_system(params.system, everything=everything),
                max_new_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                **pin,
            )
        except answering.AnswerRefused as refused:
            return refusal_error(refused, model=params.model)

        completion = {
            "id": f"chatcmpl-{session.request.id}",
            "created": int(time.time()),
            "model": session.request.adapter or BASE_MODEL_ID,
        }
        if params.stream:
            return answering.sse_response(
                session, chunk_renderer(completion, params.include_usage), asgi=isinstance(request, ASGIRequest)
            )
        end = await session.result()  # a client that goes away cancels this view, and the answer with it
        reason = end_reason(end)
        if reason not in FINISH_REASONS:
            return JsonResponse(not_generated(reason), status=500 if reason == ERROR else 503, json_dumps_params={"ensure_ascii": False})
        return JsonResponse(
            {
                **completion,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": end.text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": FINISH_REASONS[reason],
                    }
                ],
                "usage": usage(end.stats),
                "csp": grounding_field(end),
            },
            json_dumps_params={"ensure_ascii": False},
        )


def model_list(*, everything):
    """OpenAI model objects: the active version (or "base"), then, when `everything` (staff), the
    other versions newest first and "base"."""

    def entry(model_id, when):
        return {"id": model_id, "object": "model", "created": int(when.timestamp()) if when else 0, "owned_by": OWNER}

    if not everything:  # a customer lists exactly what pinned_adapter lets it name
        active = AdapterVersion.objects.filter(is_active=True).first()
        return [entry(active.name, active.activated_at or active.created_at) if active else entry(BASE_MODEL_ID, None)]
    versions = list(AdapterVersion.objects.order_by("-created_at", "-pk"))
    active = next((v for v in versions if v.is_active), None)
    listed = [entry(active.name, active.activated_at or active.created_at)] if active else []
    listed += [entry(v.name, v.created_at) for v in versions if v is not active]
    base = entry(BASE_MODEL_ID, None)
    return [base, *listed] if active is None else [*listed, base]


class ModelsView(OpenAIView):
    http_method_names = ["get"]

    async def get(self, request, user):
        return JsonResponse({"object": "list", "data": await sync_to_async(model_list)(everything=full_access(user))})


# Mounted at /v1/ by csplatform/urls.py, where OpenAI clients expect it (base_url=".../v1").
urlpatterns = [
    path("chat/completions", ChatCompletionsView.as_view(), name="openai-chat-completions"),
    path("models", ModelsView.as_view(), name="openai-models"),
]
