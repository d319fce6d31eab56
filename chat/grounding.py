"""Grounded answers in the answer pipeline: which mode answers a message, the answers that need
no model, and what a customer sees of a generated one.

`plan_answer` retrieves the approved pairs for the customer's message (with the conversation's
earlier questions, for follow-ups) and picks the mode (llm.grounding.decide) with the thresholds
of the version that would answer:

- `curated` and `fallback` need no model: a `CannedRequest` streams the curated answer or the
  fallback reply through the same events an engine request sends, so every transport handles them
  as it handles generated answers (first token in milliseconds, even before any version exists).
- `grounded` goes to the engine, the references in the question's turn when the version was
  trained on them (RAFT); a `GuardedStream` sits between the engine and the reader: every number,
  amount, date, phone, URL and e-mail is held back until the fact guard found it in the retrieved
  answers or the customer's messages. A fact found in neither replaces the answer with the best
  curated answer when that is confident enough (Thresholds.correction), else with the fallback reply (finish reason `corrected`
  or `fallback`); the trained "no answer in the references" sentence becomes the fallback reply.

Which pairs were retrieved (rank, score) and which the answer used are stored on the answer.
"""

import asyncio
import dataclasses
import logging
import re
import threading
import uuid
from dataclasses import dataclass
from time import monotonic

from django.conf import settings
from django.utils.translation import gettext as _

from chat.models import Conversation, Message
from chat.services import is_uuid
from knowledge.retrieval import serving_index
from llm import calibration, grounding
from llm.engine import Done, Stats, Token
from llm.facts import FactGuard
from llm.finetune.config import read_saved_record
from llm.prompting import Turn
from llm.retrieval import customer_text
from training.models import AdapterVersion

logger = logging.getLogger(__name__)

# Earlier customer messages of the conversation that a question is retrieved with (follow-ups).
CONTEXT_QUESTIONS = 2
# A grounded answer "used" a retrieved pair when at least this share of its character bigrams
# occur in the pair's answer.
USED_OVERLAP = 0.3


def fallback_reply():
    """What the assistant says when the knowledge base holds no answer (in the active language)."""
    return settings.CSP_FALLBACK_REPLY or _(
        "Sorry, I am not sure about that. Would you like to talk to a person? An agent can answer you here."
    )


def thresholds(version):
    """The mode thresholds for answers of `version` (None: no version yet): each one from its
    setting when set, else the version's calibration, else the built-in default (the confidence
    bar: `confident_threshold`)."""
    default = grounding.DEFAULT_THRESHOLDS

    def pick(name):
        configured = getattr(settings, f"CSP_{name.upper()}_THRESHOLD")
        if configured is not None:
            return configured
        calibrated = getattr(version, f"{name}_threshold", None) if version is not None else None
        return calibrated if calibrated is not None else getattr(default, name)

    curated, fallback = pick("curated"), pick("fallback")
    return grounding.Thresholds(curated=curated, fallback=min(fallback, curated), confident=confident_threshold(version))


def confident_threshold(version):
    """The confidence bar of `version`'s answers (llm.grounding.Thresholds.confident; None: off):
    CSP_CONFIDENT_THRESHOLD when set ("off": None), else the version's calibrated bar (None for
    versions calibrated before it), else the built-in default when no version answers yet."""
    configured = settings.CSP_CONFIDENT_THRESHOLD
    if configured is not None:
        return None if configured == "off" else configured
    if version is None:
        return grounding.DEFAULT_THRESHOLDS.confident
    return (getattr(version, "calibration", None) or {}).get("confident_threshold")


def _grounding_record(version):
    try:
        return read_saved_record(version.path) if version is not None else {}
    except OSError:
        return {}


def trained_on_references(version):
    """Whether `version` was trained on grounded prompts (RAFT); older ones read bare questions."""
    return bool(_grounding_record(version).get("grounding"))


def trained_to_pick(version):
    """Whether `version` was also trained to name the matching pair (llm.grounding.choose)."""
    record = _grounding_record(version)
    return bool(record.get("grounding") and record.get("select"))


@dataclass
class Plan:
    """How one message is answered."""

    decision: grounding.Decision | None  # None: grounding is off, the engine answers as before
    version: AdapterVersion | None  # the version that answers (None: the base model)
    references_in_prompt: bool = False  # grounded: the version reads the references
    question: str = ""
    customer_texts: tuple = ()  # the customer's messages: facts in them may be repeated
    # Read where the request's language is active (the decode thread has none).
    fallback_text: str = ""
    thresholds: grounding.Thresholds | None = None
    picks: bool = False  # grounded, and the version is to be asked which pair matches first (`rerank`)

    @property
    def mode(self):
        return self.decision.mode if self.decision is not None else ""

    @property
    def needs_engine(self):
        return self.decision is None or self.decision.mode == grounding.GROUNDED

    @property
    def sources(self):
        """The retrieved pairs as stored: [{"pair", "rank", "score", "question"}] (the question as
        it read when it was cited: a pair edited later keeps its citations readable)."""
        if self.decision is None:
            return []
        return [
            {
                "pair": hit.pair_id, "rank": hit.rank, "score": round(float(hit.score), 4), "question": hit.question,
                # close enough to offer the customer if the answer falls back (`suggestions`)
                "suggest": self.thresholds is not None and hit.score >= self.thresholds.fallback,
            }
            for hit in self.decision.hits
        ]

    def reply(self):
        """The whole answer of a mode that needs no model."""
        if self.mode == grounding.CURATED:
            return self.decision.best.answer
        return self.fallback_text or fallback_reply()

    def used(self, text):
        """The ids of the retrieved pairs an answer with `text` drew on."""
        if self.mode == grounding.CURATED:
            return [self.decision.best.pair_id]
        if self.mode != grounding.GROUNDED:
            return []
        return [hit.pair_id for hit in self.decision.hits if overlap(text, hit.answer) >= USED_OVERLAP]

    def prompt_turns(self, turns):
        """The turns the engine gets: the last question with the references when the version
        was trained on them, else unchanged."""
        if not self.references_in_prompt:
            return turns
        question = grounding.grounded_question(turns[-1].text, self.decision.hits)
        return [*turns[:-1], Turn("user", question)]


def _bigrams(text):
    text = re.sub(r"\s+", "", text)
    return {text[i : i + 2] for i in range(len(text) - 1)}


def overlap(text, source):
    """The share of `text`'s character bigrams that occur in `source`."""
    grams = _bigrams(text)
    return len(grams & _bigrams(source)) / len(grams) if grams else 0.0


def earlier_questions(*, conversation_id, session_key="", user=None):
    """The conversation's last customer messages, oldest first ([] for a new or foreign one)."""
    if not conversation_id or not is_uuid(conversation_id):
        return []  # answer_start refuses a malformed id with not_found
    conversation = Conversation.objects.filter(pk=conversation_id).first()
    if conversation is None or not conversation.belongs_to(session_key=session_key, user=user):
        return []  # answer_start refuses it with not_found
    texts = conversation.messages.filter(role=Message.Role.USER).order_by("-created_at", "-id").values_list("text", flat=True)
    return list(reversed(texts[:CONTEXT_QUESTIONS]))


def answering_version(options):
    """The version that answers: the pinned one (`adapter` in options; None pins the base model)
    or the active one."""
    if "adapter" in options:
        name = options["adapter"]
        return AdapterVersion.objects.filter(name=name).first() if name else None
    return AdapterVersion.objects.filter(is_active=True).first()


def plan_answer(*, text="", turns=None, conversation_id=None, session_key="", user=None, options=None):
    """The Plan for a message: `text` in conversation `conversation_id`, or the last of `turns`.
    Reads the database and the index; writes nothing. Sync."""
    if not settings.CSP_GROUNDING:
        return Plan(decision=None, version=None)
    if turns is not None:
        question = turns[-1].text
        context = [turn.text for turn in turns[:-1] if turn.role == "user"][-CONTEXT_QUESTIONS:]
    else:
        question = text
        context = earlier_questions(conversation_id=conversation_id, session_key=session_key, user=user)
    version = answering_version(options or {})
    limits = thresholds(version)
    try:
        hits = serving_index().search(question, k=settings.CSP_GROUNDING_K, context=tuple(context))
    except Exception:  # the customer is offered a person rather than an error; the operator sees why
        logger.exception("retrieval failed; answering with the fallback reply")
        hits = ()
    decision = grounding.decide(hits, limits, can_ground=version is not None)
    if decision.mode == grounding.GROUNDED and not settings.CSP_GROUNDED_GENERATION:
        decision = grounding.Decision(grounding.FALLBACK, decision.hits, f"{decision.reason}; generation is off (CSP_GROUNDED_GENERATION)")
    grounded = decision.mode == grounding.GROUNDED
    return Plan(
        decision=decision,
        version=version,
        references_in_prompt=grounded and trained_on_references(version),
        question=question,
        customer_texts=(*context, question),
        fallback_text=fallback_reply(),
        thresholds=limits,
        picks=grounded and settings.CSP_RERANK and trained_to_pick(version) and pick_min_prob(version) <= 1.0,
    )


# --- the adapter's pick among the retrieved pairs ---


def _pick_request(plan, engine, options):
    """(turns, submit options) of the question "which of these pairs?", or None when this plan is
    not to be asked: not grounded, a version not trained to pick, or an engine in another process
    (the worker and remote backends answer free text only)."""
    if not plan.picks or not getattr(engine, "supports_choices", False):
        return None
    candidates = plan.decision.hits[: settings.CSP_GROUNDING_K]
    turns = [Turn("user", grounding.selection_question(plan.question, candidates))]
    pinned = {key: options[key] for key in ("adapter", "adapter_path", "system") if key in options}
    if "adapter" not in pinned:
        # The version whose training says it picks, by name: the process's engine switches to a
        # newly activated version up to ACTIVE_CHECK_SECONDS later, and the version before it may
        # never have learnt to pick.
        pinned.update(adapter=plan.version.name, adapter_path=plan.version.path)
    return turns, {"choices": grounding.choice_labels(len(candidates)), **pinned}


def pick_min_prob(version):
    """How likely `version`'s pick must be to decide an answer: CSP_RERANK_MIN_PROB when set, else
    the bar its run calibrated (above 1: its picks decide nothing, so none is asked), else 0.5 for
    versions calibrated before picks were (llm.calibration.pick_min_prob)."""
    return calibration.pick_min_prob(getattr(version, "calibration", None), settings.CSP_RERANK_MIN_PROB)


def _picked(plan, probs):
    decision = grounding.choose(plan.decision, probs or [], min_prob=pick_min_prob(plan.version))
    logger.debug("pick among retrieved pairs: %s", decision.reason)
    still_grounded = decision.mode == grounding.GROUNDED
    return dataclasses.replace(plan, decision=decision, picks=False, references_in_prompt=plan.references_in_prompt and still_grounded)


def rerank(plan, engine, options):
    """The plan after the version named which retrieved pair, if any, the question is about (one
    prefill and one token on `engine`, blocking): a sure pick answers with that pair's curated
    text, a sure "none" with the fallback, an unsure one stays grounded. The engine's refusals
    at submit (EngineError: busy, closed) propagate, as the answer's own submit would raise them;
    a failure or a timeout after it leaves the plan grounded and is logged."""
    asked = _pick_request(plan, engine, options)
    if asked is None:
        return plan
    request = engine.submit(asked[0], **asked[1])  # EngineError (busy, closed): the answer's own submit would raise it too
    try:
        _text, stats = request.result(settings.CSP_CHAT_MAX_SECONDS)
    except Exception:
        logger.exception("the pick among the retrieved pairs failed; the answer is generated")
        return dataclasses.replace(plan, picks=False)
    finally:
        request.cancel()  # a no-op once it is done; else it stops taking the engine's time
    return _picked(plan, stats.choice_probs)


async def arerank(plan, engine, options):
    """`rerank` from an event loop: the pick is awaited, not waited for."""
    asked = _pick_request(plan, engine, options)
    if asked is None:
        return plan
    request = await engine.asubmit(asked[0], **asked[1])
    try:
        async with asyncio.timeout(settings.CSP_CHAT_MAX_SECONDS):
            async for _event in request:
                pass
    except Exception:
        logger.exception("the pick among the retrieved pairs failed; the answer is generated")
        return dataclasses.replace(plan, picks=False)
    finally:
        request.cancel()
    return _picked(plan, request.stats.choice_probs)


def wire_sources(sources):
    """The retrieved pairs as clients get them: ids, ranks and scores (the questions are the
    knowledge base's, shown to customers only with CSP_CHAT_SHOW_SOURCES)."""
    return [{key: source[key] for key in ("pair", "rank", "score")} for source in sources or ()]


def suggestions(sources, mode):
    """What a fallback reply offers the customer to ask instead ("did you mean"): the retrieved
    pairs that scored at least the fallback threshold, best first, at most CSP_CHAT_SUGGESTIONS,
    as [{"pair", "question"}] with the question as a customer would type it. Asking one of them
    word for word gets its curated answer. None for any other mode: an answer was given, or
    nothing retrieved was close (an unrelated list would only mislead)."""
    if mode != grounding.FALLBACK or settings.CSP_CHAT_SUGGESTIONS <= 0:
        return []
    offered = [source for source in sources or () if source.get("suggest")]
    return [{"pair": source["pair"], "question": customer_text(source["question"])} for source in offered][: settings.CSP_CHAT_SUGGESTIONS]


def offers(sources, mode):
    """What an answer offers the customer besides its text, for every transport (the websocket's
    done frame, the REST answer, /v1's `csp`, the page's history): a person with the fallback
    reply (`handoff_offered`) and, with it, the close curated questions (`suggestions`)."""
    return {"handoff_offered": mode == grounding.FALLBACK, "suggestions": suggestions(sources, mode)}


def cited_questions(sources, used):
    """The questions of the pairs an answer used, for the chat page when CSP_CHAT_SHOW_SOURCES."""
    if not settings.CSP_CHAT_SHOW_SOURCES:
        return []
    return [source.get("question", "") for source in sources or () if source["pair"] in set(used or ())]


# --- answers without a model ---

PIECE = re.compile(r"[^，。！？；：,.!?;:\n]*[，。！？；：,.!?;:\n]*")


def pieces(text):
    """A whole answer cut after its punctuation, streamed as it would be by a model."""
    return [piece for piece in PIECE.findall(text) if piece]


class CannedRequest:
    """An answer that needs no model (curated, fallback), with the engine request's interface:
    `start()` sends its Token events and Done through `on_event`, at once."""

    def __init__(self, text, *, adapter, on_event, submitted):
        self.id = uuid.uuid4().hex[:16]
        self.adapter = adapter
        self.text = text
        self.stats = Stats(request_id=self.id, adapter=adapter)
        self._on_event = on_event
        self._submitted = submitted  # monotonic() when the message arrived: retrieval counts
        self._cancelled = threading.Event()

    def start(self):
        parts = pieces(self.text)
        self.stats.first_token_ms = (monotonic() - self._submitted) * 1000
        for part in parts:
            self._on_event(Token(part))
        self.stats.tokens = len(parts)
        self.stats.finish_reason = "stop"
        self.stats.latency_ms = (monotonic() - self._submitted) * 1000
        self._on_event(Done(self.stats))

    def cancel(self):
        self._cancelled.set()  # it has ended already: start() runs to its end at once

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    @property
    def done(self):
        return bool(self.stats.finish_reason)


# --- generated answers, guarded ---


@dataclass(frozen=True)
class Replace:
    """Sent instead of the rest of a generated answer: everything shown so far is to be replaced
    by `text` (the best curated answer or the fallback reply)."""

    text: str


class GuardedStream:
    """Between the engine and the reader of a grounded answer, on the engine's decode thread:
    passes on the text the fact guard has checked, holds what may still become the trained
    fallback sentence, and replaces the answer when either says so."""

    def __init__(self, plan, *, on_event):
        self.plan = plan
        self._on_event = on_event
        sources = [hit.answer for hit in plan.decision.hits] + list(plan.customer_texts)
        self._guard = FactGuard(sources)
        self._held = ""  # generated text that may still be the trained fallback sentence
        self._marker_open = plan.references_in_prompt
        self.shown = []  # the pieces passed on
        self.outcome = None  # (finish reason, mode, text) once the answer was replaced
        self.request = None
        self._lock = threading.Lock()

    def attach(self, request):
        with self._lock:
            self.request = request
            replaced = self.outcome is not None
        if replaced:
            request.cancel()

    @property
    def text(self):
        return self.outcome[2] if self.outcome is not None else "".join(self.shown)

    @property
    def mode(self):
        return self.outcome[1] if self.outcome is not None else self.plan.mode

    def __call__(self, event):
        if isinstance(event, Token):
            if self.outcome is None:
                self._feed(event.text)
            return
        if isinstance(event, Done):
            # An answer its reader stopped ends as it stands (cancelled): what the guard holds is dropped.
            if self.outcome is None and not (self.request is not None and self.request.cancelled):
                self._end()
            stats = event.stats
            if self.outcome is not None:
                stats = dataclasses.replace(stats, finish_reason=self.outcome[0])
            self._on_event(Done(stats))
            return
        self._on_event(event)

    def _feed(self, text):
        if self._marker_open:
            self._held += text
            said = self._held.lstrip()
            if said.startswith(grounding.TRAINED_FALLBACK):
                self._replace(grounding.FALLBACK, grounding.FALLBACK, self.plan.fallback_text)
                return
            if grounding.TRAINED_FALLBACK.startswith(said):
                return  # it may still become the sentence
            self._marker_open = False
            text, self._held = self._held, ""
        self._show(self._guard.feed(text))
        if self._guard.violation is not None:
            self._correct()

    def _end(self):
        if self._marker_open and self._held:
            # The answer ended inside what could have been the sentence: it is not the sentence.
            self._marker_open = False
            self._show(self._guard.feed(self._held))
            self._held = ""
        if self._guard.violation is None:
            self._show(self._guard.finish())
        if self._guard.violation is not None:
            self._correct()

    def _show(self, text):
        if text:
            self.shown.append(text)
            self._on_event(Token(text))

    def _correct(self):
        best = self.plan.decision.best
        if best is not None and best.score >= self.plan.thresholds.correction:
            self._replace(grounding.CORRECTED, grounding.CURATED, best.answer)
        else:
            self._replace(grounding.FALLBACK, grounding.FALLBACK, self.plan.fallback_text)

    def _replace(self, reason, mode, text):
        with self._lock:
            self.outcome = (reason, mode, text)
            request = self.request
        if request is not None:
            request.cancel()
        self._on_event(Replace(text) if self.shown else Token(text))
