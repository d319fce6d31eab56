"""The `openai` backend: answers come from an OpenAI-compatible server (vLLM) that serves each
adapter version under its own name.

    engine = OpenAIEngine(EngineConfig(remote_url="http://gpu-host:8000/v1", remote_api_key="..."))
    engine.set_adapter("v3")                      # new requests ask for model "v3"
    text, stats = engine.generate([Turn("user", "如何退货？")])
    engine.generate(history, adapter=None)        # the base model: config.remote_base_model ("base")

Each request is one POST /chat/completions with `stream: true` (and `stream_options.include_usage`
for the token counts) on a connection of its own, read line by line by a thread of its own; a
cancel, the max_seconds cap and close() shut that connection, which is how an OpenAI server
learns that nobody listens any more and stops generating. Nothing is sent until the server has
answered the headers: a refusal (429 busy, 400 context too long, 404 unknown model, 401 key) is
raised by `submit()` as a local engine raises it. The leak guard (llm.engine.guard) watches the
text here, as on a local engine: the server knows nothing of CSP_CHAT_CANARIES.

The platform decides which version is active (`follows_active`: chat.serving records the active
version's name here, a cheap assignment); the server only has to serve every version by name, as
`vllm serve ... --enable-lora --lora-modules v3=...` does. Standard library only; nothing here
imports Django. (A module named `openai` inside this package does not shadow the PyPI client,
which this platform does not use anyway: imports are absolute.)
"""

import http.client
import json
import logging
import math
import socket
import threading
import time
from urllib.parse import urlsplit

from llm.engine.events import (
    CANCELLED,
    ERROR,
    FILTERED,
    LENGTH,
    STOP,
    TIMEOUT,
    BackendUnavailable,
    EngineBusy,
    EngineError,
    InputTooLong,
    Stats,
)
from llm.engine.guard import LeakGuard
from llm.engine.remote import SILENCE_GRACE_SECONDS, RemoteEngine

logger = logging.getLogger(__name__)

# A server that has not accepted the TCP connection by then is down or unreachable: say so at
# once instead of leaving the customer's "start" frame waiting.
CONNECT_TIMEOUT_SECONDS = 5.0
# OpenAI's finish reasons in the engine's words ("abort": vLLM's for a request it dropped).
FINISH_REASONS = {"stop": STOP, "length": LENGTH, "content_filter": FILTERED, "abort": CANCELLED}
# What an error event inside a stream may name (this platform's own server says why it ended).
STREAM_ERRORS = {CANCELLED: CANCELLED, TIMEOUT: TIMEOUT}
MAX_ERROR_BODY = 64 * 1024


class UnknownModel(EngineError, ValueError):
    """The server serves no model of that name (an adapter version it was not started with).
    A ValueError too: the OpenAI views answer it as a model they cannot load."""


class _Stream:
    """One request's connection, and why this side shut it (if it did)."""

    def __init__(self, connection, guard):
        self.connection = connection
        self.guard = guard  # the leak guard holds here too: the server does not know the canaries
        self.sock = None  # kept: http.client may hand the socket to the response and forget it
        self.timer = None
        self.timed_out = False

    def shut(self):
        sock = self.sock or self.connection.sock
        if sock is not None:
            try:  # wakes the reader thread blocked in recv(); close() alone would not
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connection.close()


class OpenAIEngine(RemoteEngine):
    backend = "openai"
    follows_active = True  # chat.serving tells it the active version's name before new answers

    def __init__(self, config):
        super().__init__(config)
        url = urlsplit(config.remote_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise BackendUnavailable(f"the openai backend needs an http(s) URL ending in /v1, not {config.remote_url!r}")
        self.url = config.remote_url.rstrip("/")
        self._connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._path = url.hostname, url.port, url.path
        # Past max_seconds the request is ended here anyway; the grace covers a server's first byte.
        self.read_timeout = config.max_seconds + SILENCE_GRACE_SECONDS
        self.dtype_reason = f"served by the OpenAI-compatible server at {self.url}"
        self._streams = {}  # request id -> _Stream

    # -- what RemoteEngine asks of a subclass

    def model_for(self, adapter):
        """The `model` a request for `adapter` (None: the base model) names."""
        return adapter if adapter is not None else self.config.remote_base_model

    def adapter_for(self, model):
        return None if model == self.config.remote_base_model else model

    def _start(self, request, payload):
        model = self.model_for(payload["adapter"] if payload["pinned"] else self.current_adapter)
        guard = None
        if self.config.guard_min_run:  # the server's default system prompt is presumably the platform's
            system = payload["system"] if payload["system"] is not None else self.config.system_prompt
            guard = LeakGuard([system, *self.config.canaries], min_run=self.config.guard_min_run)
        stream = _Stream(self._connection_class(self._host, self._port, timeout=CONNECT_TIMEOUT_SECONDS), guard)
        with self._lock:
            self._streams[request.id] = stream
        stream.timer = threading.Timer(self.config.max_seconds, self._time_out, args=(request,))
        stream.timer.daemon = True
        stream.timer.start()
        try:
            response = self._post(stream, self._body(model, payload))
            if response.status != 200:
                raise self._refusal(response, model)
            if not (response.getheader("Content-Type") or "").startswith("text/event-stream"):
                raise EngineError(
                    f"{self.url}/chat/completions answered {response.getheader('Content-Type')!r}, not a stream of "
                    f"events: is CSP_OPENAI_BASE_URL an OpenAI-compatible server's /v1?"
                )
        except BaseException:
            self._drop(request)
            raise
        request.remote = {"model": model}
        request.accepted(self.adapter_for(model))
        threading.Thread(
            target=self._read, args=(request, stream, response), name=f"openai-{request.id}", daemon=True
        ).start()

    def _cancel(self, request):
        with self._lock:
            stream = self._streams.get(request.id)
        if stream is not None:
            stream.shut()

    def _disconnect(self):
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.shut()

    # -- the request

    def _body(self, model, payload):
        messages = [{"role": "system", "content": payload["system"]}] if payload["system"] is not None else []
        messages += [{"role": role, "content": text} for role, text in payload["history"]]
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": payload["max_new_tokens"],
            "temperature": payload["temperature"],
            "top_p": payload["top_p"],
        }
        if payload["seed"] is not None:
            body["seed"] = payload["seed"]
        return body

    def _post(self, stream, body):
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", "User-Agent": "csplatform"}
        if self.config.remote_api_key:
            headers["Authorization"] = f"Bearer {self.config.remote_api_key}"
        connection = stream.connection
        try:
            connection.connect()
            stream.sock = connection.sock
            stream.sock.settimeout(self.read_timeout)
            connection.request("POST", f"{self._path}/chat/completions", json.dumps(body, ensure_ascii=False).encode(), headers)
            return connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            why = "it did not answer in time" if stream.timed_out else f"{type(error).__name__}: {error}"
            raise EngineError(f"the OpenAI-compatible server at {self.url} cannot be reached ({why})") from error

    def _refusal(self, response, model):
        """The engine's exception for a non-200 answer (OpenAI's error shape, or vLLM's older one)."""
        raw = response.read(MAX_ERROR_BODY)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else body
        error = error if isinstance(error, dict) else {}
        message = str(error.get("message") or raw[:200].decode("utf-8", "replace").strip() or response.reason)
        code, status = error.get("code"), response.status
        if status == 429:
            return EngineBusy(retry_after=_retry_after(response.getheader("Retry-After")))
        if code == "context_length_exceeded" or "context length" in message.lower():
            return InputTooLong(message, limit=None, size=None, unit="tokens")
        if status in (401, 403):
            return EngineError(f"the server at {self.url} refused the API key (HTTP {status}; CSP_OPENAI_API_KEY): {message}")
        # Only a JSON error about the model: a 404 page means the URL is wrong, not the model.
        if status == 404 and (code == "model_not_found" or error.get("param") == "model" or (error and "model" in message.lower())):
            return UnknownModel(f"the server at {self.url} serves no model {model!r} (start it with that LoRA module): {message}")
        return EngineError(f"the server at {self.url} answered HTTP {status}: {message}")

    def _read(self, request, stream, response):
        """The reader thread: text to the request as it comes, then its end with the server's counts."""
        finish = error = None
        usage, pieces, answered_by = {}, 0, request.remote["model"]
        try:
            for data in _events(response):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if isinstance(chunk.get("error"), dict):  # the status line was sent already: an error event
                    failure = chunk["error"]
                    finish = STREAM_ERRORS.get(failure.get("code"), ERROR)
                    error = str(failure.get("message") or failure.get("code") or "the server ended the answer")
                    break
                answered_by = chunk.get("model") or answered_by
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        pieces += 1
                        request.feed(stream.guard.push(text) if stream.guard else text)
                        if stream.guard and stream.guard.tripped:  # closing the connection stops the server
                            logger.warning("request %s stopped: its answer began to repeat protected text", request.id)
                            finish = FILTERED
                            break
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
                        finish = FINISH_REASONS.get(reason, ERROR)
                        error = None if reason in FINISH_REASONS else f"the server ended with finish_reason {reason!r}"
                if stream.guard and stream.guard.tripped:
                    break
        except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
            if finish is None and not (request.cancelled or stream.timed_out):
                finish, error = ERROR, f"the stream from {self.url} broke: {type(exc).__name__}: {exc}"
        finally:
            self._drop(request)
        if request.cancelled:
            finish, error = CANCELLED, None
        elif stream.timed_out and finish is None:
            finish = TIMEOUT
        elif finish is None:
            finish, error = ERROR, f"the stream from {self.url} ended before the answer did"
        if stream.guard and finish not in (CANCELLED, FILTERED):
            request.feed(stream.guard.finish())  # the held tail was safe after all
        self.requests_finished += 1
        request.end(Stats(
            request_id=request.id,
            adapter=self.adapter_for(answered_by),
            finish_reason=finish,
            tokens=usage.get("completion_tokens", pieces),
            prompt_tokens=usage.get("prompt_tokens", 0),
            first_token_ms=request.stats.first_token_ms,
            latency_ms=(time.monotonic() - request.created) * 1000,
            error=error,
        ))

    def _time_out(self, request):
        with self._lock:
            stream = self._streams.get(request.id)
        if stream is not None:
            stream.timed_out = True
            stream.shut()

    def _drop(self, request):
        with self._lock:
            stream = self._streams.pop(request.id, None)
        if stream is not None:
            if stream.timer is not None:
                stream.timer.cancel()
            stream.shut()


def _events(response):
    """The data of each Server-Sent Event in `response` (comments and other fields skipped)."""
    data = []
    while line := response.readline():
        line = line.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def _retry_after(header):
    try:
        return max(1, math.ceil(float(header)))
    except (TypeError, ValueError):
        return 1
