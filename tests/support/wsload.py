"""Websocket clients that load a live server (issue #6 stress scenarios; never used in production).

    from tests.support.wsload import ChatClient, chat_load, flood, silent_sockets
    with live_daphne(env=..., log=...) as url:
        report = chat_load(url, chats=200, duration=10, questions=["如何退货？"])
        print(report.summary())

tests/test_load.py runs them scaled down with pass/fail checks; benchmarks/stress.py runs them full
size. They speak the protocol of DESIGN.md through websocket-client (one thread per chat: the
server, not the client, is what is measured) and import nothing from Django.
"""

import collections
import concurrent.futures
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import websocket

from tests.support.stats import percentile

# Malformed client frames and the error code each must get back (the socket stays open).
GARBAGE = [
    ("{not json", "invalid"),
    ("[1, 2]", "invalid"),
    ('"just a string"', "invalid"),
    (b"\x00\xff binary", "invalid"),
    ('{"type": "nope"}', "invalid"),
    ('{"type": ["message"]}', "invalid"),
    ('{"type": {"a": 1}}', "invalid"),
    ("[" * 8000, "invalid"),  # nesting deeper than the JSON decoder's recursion limit
    ('{"type": "message", "text": 42}', "invalid"),
    ('{"type": "message", "text": "   "}', "invalid"),
    ('{"type": "message", "text": "' + "长" * 2100 + '"}', "too_long"),
    ('{"type": "message", "text": "你好", "conversation": "not-a-uuid"}', "not_found"),
    ('{"type": "feedback", "message": [1], "rating": 7}', "invalid"),
    ('{"type": "join", "conversation": {"id": 1}}', "not_found"),
    ('{"type": "rate", "conversation": null, "rating": "five"}', "invalid"),
    ("x" * 12000, "too_long"),
]


# The flooder connects from its own loopback address, so that the server can tell it from the
# polite customers (on 127.0.0.1) as it tells apart clients on the internet.
FLOODER_ADDRESS = "127.0.0.2"


def ws_url(base_url):
    """ws://host:port/ws/chat/ for the server at http://host:port."""
    return "ws://" + base_url.split("://", 1)[1].rstrip("/") + "/ws/chat/"


class Closed(Exception):
    """The server closed the socket; `code` is its close code (None: the connection just ended)."""

    def __init__(self, code):
        super().__init__(f"closed by the server (code {code})")
        self.code = code


@dataclass
class Exchange:
    """One customer message and what came back; times in seconds after it was sent."""

    sent_at: float  # time.monotonic() when sent
    reply: str = ""  # type of the first frame: start, busy or error; "" when none came (a hang)
    reply_s: float | None = None
    first_token_s: float | None = None
    ended_at: float | None = None  # monotonic, when the done (or error) frame came
    adapter: str | None = None  # the version the start frame names
    done: dict | None = None
    error: dict | None = None
    retry_after: float = 0.0
    hung: bool = False  # the server went silent longer than `hang_after` in the middle of it


class ChatClient:
    """One customer's socket. The Origin is the server's own, as the chat page sends it."""

    def __init__(self, base_url, *, cookie=None, timeout=30, source=None):
        """source: the local address to connect from (e.g. "127.0.0.2": another client to the server)."""
        tcp = None
        if source is not None:
            host, port = base_url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
            tcp = socket.create_connection((host, int(port)), timeout=timeout, source_address=(source, 0))
        self.socket = websocket.create_connection(
            ws_url(base_url), origin=base_url.rstrip("/"), cookie=cookie, timeout=timeout, socket=tcp
        )
        self.conversation = None

    def send(self, frame):
        """A dict as JSON text, a str as text, bytes as a binary frame."""
        if isinstance(frame, bytes):
            self.socket.send_binary(frame)
        else:
            self.socket.send(frame if isinstance(frame, str) else json.dumps(frame, ensure_ascii=False))

    def receive(self, timeout):
        """The next frame as a dict, None after `timeout` seconds of silence; Closed when closed.
        Pings are answered while waiting (websocket-client does it inside recv)."""
        self.socket.settimeout(timeout)
        try:
            opcode, frame = self.socket.recv_data_frame()
        except websocket.WebSocketTimeoutException:
            return None
        except (websocket.WebSocketConnectionClosedException, ConnectionError) as exc:
            raise Closed(None) from exc
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise Closed(int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None)
        return json.loads(frame.data)

    def ask(self, text, *, hang_after=10.0):
        """Send a message in this client's conversation and follow its answer to the end."""
        exchange = Exchange(sent_at=time.monotonic())
        self.send({"type": "message", "text": text, "conversation": self.conversation})
        while True:
            frame = self.receive(hang_after)
            now = time.monotonic() - exchange.sent_at
            if frame is None:
                exchange.hung = True
                return exchange
            kind = frame.get("type")
            if not exchange.reply:
                exchange.reply, exchange.reply_s = kind, now
            if kind == "start":
                exchange.adapter = frame.get("adapter")
                self.conversation = frame["conversation"]
            elif kind == "token" and exchange.first_token_s is None:
                exchange.first_token_s = now
            elif kind == "busy":
                exchange.retry_after = float(frame.get("retry_after") or 1)
                return exchange
            elif kind == "error":
                exchange.error = frame
                if exchange.reply == "error":  # refused before it started
                    exchange.ended_at = time.monotonic()
                    return exchange
            elif kind == "done":
                exchange.done, exchange.ended_at = frame, time.monotonic()
                return exchange

    def close(self):
        try:
            self.socket.close(timeout=1)
        except (OSError, websocket.WebSocketException):
            pass


@dataclass
class LoadReport:
    chats: int
    duration: float
    exchanges: list = field(default_factory=list)
    connect_failures: list = field(default_factory=list)
    closed: list = field(default_factory=list)  # close codes of sockets the server closed mid-run
    during: object = None  # what the `during` callable returned

    @property
    def started(self):
        return [e for e in self.exchanges if e.reply == "start"]

    @property
    def hangs(self):
        return [e for e in self.exchanges if e.hung]

    @property
    def errors(self):
        return [e for e in self.exchanges if e.error is not None]

    def replies_slower_than(self, seconds):
        """Messages whose first frame (start, busy or error) took longer than `seconds`, or never came."""
        return [e for e in self.exchanges if e.reply_s is None or e.reply_s > seconds]

    def summary(self):
        counts = collections.Counter(e.reply or "none" for e in self.exchanges)
        replies = [e.reply_s for e in self.exchanges if e.reply_s is not None]
        tokens = [e.first_token_s for e in self.started if e.first_token_s is not None]
        p95_reply = f"{percentile(replies, 95) * 1000:.0f} ms" if replies else "-"
        p95_token = f"{percentile(tokens, 95) * 1000:.0f} ms" if tokens else "-"
        return (
            f"{self.chats} chats x {self.duration:.0f} s: {len(self.exchanges)} messages, "
            f"{counts['start']} streamed, {counts['busy']} busy, {counts['error']} refused; "
            f"first frame p95 {p95_reply}, max {max(replies) * 1000 if replies else 0:.0f} ms; "
            f"first token p95 {p95_token}; {len(self.hangs)} hangs, {len(self.errors)} error frames, "
            f"{len(self.connect_failures)} failed connects, {len(self.closed)} closed"
        )


def chat_load(base_url, *, chats, duration, questions, cookie=None, hang_after=10.0, during=None, turns=None):
    """`chats` customers chat in their own conversation for `duration` seconds, each message after
    the previous answer; a `busy` reply is retried after its retry_after (as the page does).
    All sockets connect first, then all start together; `turns` caps each one's messages. `during`,
    when given, is called in this thread once everyone has started; it returns the report's `during`."""
    report = LoadReport(chats=chats, duration=duration)
    lock = threading.Lock()
    connected = threading.Barrier(chats + 1)
    go = threading.Event()

    def customer(index):
        try:
            client = ChatClient(base_url, cookie=cookie)
        except (OSError, websocket.WebSocketException) as exc:
            with lock:
                report.connect_failures.append(repr(exc))
            connected.wait()
            return
        connected.wait()
        go.wait()
        deadline = time.monotonic() + duration
        turn = 0
        try:
            while time.monotonic() < deadline and (turns is None or turn < turns):
                exchange = client.ask(questions[(index + turn) % len(questions)], hang_after=hang_after)
                turn += 1
                with lock:
                    report.exchanges.append(exchange)
                if exchange.hung:
                    return
                if exchange.reply == "busy":
                    time.sleep(max(0.0, min(exchange.retry_after, deadline - time.monotonic())))
        except Closed as closed:
            with lock:
                report.closed.append(closed.code)
        finally:
            client.close()

    threads = [threading.Thread(target=customer, args=(i,), daemon=True) for i in range(chats)]
    for thread in threads:
        thread.start()
    connected.wait()
    go.set()
    if during is not None:
        report.during = during()
    for thread in threads:
        thread.join(duration + 2 * hang_after + 30)
    return report


@dataclass
class FloodReport:
    rate: float
    duration: float = 0.0
    sent: int = 0
    connections: int = 0
    refused: int = 0  # handshakes the server refused
    replies: collections.Counter = field(default_factory=collections.Counter)  # frame type or error code
    closes: collections.Counter = field(default_factory=collections.Counter)  # close codes

    def summary(self):
        return (
            f"flood {self.sent} frames in {self.duration:.1f} s ({self.sent / max(self.duration, 1e-9):.0f}/s) "
            f"over {self.connections} connections ({self.refused} refused); replies {dict(self.replies)}; closes {dict(self.closes)}"
        )


def flood(base_url, *, rate, stop, frames, cookie=None, source=FLOODER_ADDRESS):
    """One client (from address `source`) sends `frames` round-robin at `rate` per second until
    `stop` (a threading.Event) is set, reconnecting whenever the server closes it (as soon as the
    server lets it), and counts what comes back."""
    report = FloodReport(rate=rate)
    lock = threading.Lock()
    started = time.monotonic()
    next_send = started
    index = 0
    while not stop.is_set():
        try:
            client = ChatClient(base_url, cookie=cookie, timeout=10, source=source)
        except (OSError, websocket.WebSocketException):
            report.refused += 1
            time.sleep(0.05)
            continue
        report.connections += 1

        def read(client=client):
            while True:
                try:
                    frame = client.receive(5)
                except Closed as closed:
                    with lock:
                        report.closes[closed.code] += 1
                    return
                except (OSError, ValueError, websocket.WebSocketException):
                    return
                if frame is None:
                    if stop.is_set():
                        return
                    continue
                with lock:
                    report.replies[frame.get("code") or frame.get("type")] += 1

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            while not stop.is_set() and reader.is_alive():
                now = time.monotonic()
                if now < next_send:
                    time.sleep(next_send - now)
                client.send(frames[index % len(frames)])
                index += 1
                report.sent += 1
                next_send += 1 / rate
                # A flooder does not wait for anyone; but never more than a second behind schedule.
                next_send = max(next_send, time.monotonic() - 1)
        except (OSError, websocket.WebSocketException):
            pass
        client.socket.shutdown()
        reader.join(10)
    report.duration = time.monotonic() - started
    return report


def peer_closed(sock):
    """Whether the server has closed this plain socket (EOF or reset waiting in it)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def server_connections(pid, port):
    """Established TCP connections of process `pid` on its listening `port` (psutil)."""
    import psutil

    return sum(
        1 for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def server_rss(pid):
    import psutil

    return psutil.Process(pid).memory_info().rss


def wait_until(predicate, timeout, interval=0.2):
    """Poll predicate() until it is true or `timeout` seconds pass; returns the seconds it took or None."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    return None


def first_token_times(base_url, questions, *, cookie=None, hang_after=30.0):
    """Polite customers ask `questions` one after another, each on a fresh socket (far inside any
    rate limit); the seconds from each message to its first token."""
    times = []
    for question in questions:
        client = ChatClient(base_url, cookie=cookie)
        try:
            exchange = client.ask(question, hang_after=hang_after)
        finally:
            client.close()
        if exchange.first_token_s is None:
            raise AssertionError(f"no token for {question!r}: {exchange}")
        times.append(exchange.first_token_s)
    return times


# ---------------------------------------------------------------------------------------------
# scenarios: what the test checks and the benchmark tabulates, measured the same way


def garbage_replies(base_url, *, cookie=None):
    """Send each GARBAGE frame on one socket: the error code each got (or "closed <code>" when the
    server closed the socket instead; the next frame then goes on a new socket)."""
    client = ChatClient(base_url, cookie=cookie)
    replies = []
    try:
        for frame, _expected in GARBAGE:
            client.send(frame)
            try:
                reply = client.receive(10) or {}
                replies.append(reply.get("code") if reply.get("type") == "error" else reply)
            except Closed as closed:
                replies.append(f"closed {closed.code}")
                client = ChatClient(base_url, cookie=cookie)
    finally:
        client.close()
    return replies


def oversized_frame_close(base_url, size, *, cookie=None):
    """The close code a frame of `size` bytes gets (None when the socket stayed open 10 s)."""
    client = ChatClient(base_url, cookie=cookie)
    try:
        client.send("x" * size)
        while True:
            if client.receive(10) is None:
                return None
    except Closed as closed:
        return closed.code
    finally:
        client.close()


@dataclass
class FloodOutcome:
    alone: list  # polite first-token seconds without the flood
    flooded: list  # ... and while one client floods
    floods: list  # FloodReport of each flood block

    @property
    def quiet_p95(self):
        return percentile(self.alone, 95)

    @property
    def loud_p95(self):
        return percentile(self.flooded, 95)

    @property
    def rise(self):
        return self.loud_p95 / self.quiet_p95 - 1

    @property
    def seconds(self):
        return sum(f.duration for f in self.floods)

    def total(self, counter, key=None):
        """Sum over the blocks of a FloodReport number (sent, connections, refused) or counter entry."""
        if key is None:
            return sum(getattr(f, counter) for f in self.floods)
        return sum(getattr(f, counter)[key] for f in self.floods)

    def summary(self):
        closes = collections.Counter()
        for f in self.floods:
            closes.update(f.closes)
        return (
            f"flood at {self.floods[0].rate:.0f} frames/s for {self.seconds:.0f} s: {self.total('sent')} frames delivered "
            f"on {self.total('connections')} sockets, {self.total('refused')} reconnects refused, "
            f"{self.total('replies', 'rate_limited')} rate_limited, closes {dict(closes)}; polite first token p95 "
            f"{self.quiet_p95 * 1000:.0f} ms alone, {self.loud_p95 * 1000:.0f} ms during the flood ({self.rise * 100:+.0f}%)"
        )


def flood_against_polite(base_url, *, questions, rate, blocks=2, cookie=None, settle=0.5):
    """Polite customers ask `questions` alone, then while one client floods (GARBAGE plus valid
    messages at `rate` frames/s, reconnecting whenever it is closed), `blocks` times in turn so
    that both halves see the same background load."""
    frames = [frame for frame, _ in GARBAGE] + ['{"type": "message", "text": "你好"}']
    outcome = FloodOutcome([], [], [])
    for _ in range(blocks):
        outcome.alone += first_token_times(base_url, questions, cookie=cookie)
        stop, reports = threading.Event(), []
        flooder = threading.Thread(target=lambda: reports.append(flood(base_url, rate=rate, stop=stop, frames=frames)))
        flooder.start()
        time.sleep(settle)
        try:
            outcome.flooded += first_token_times(base_url, questions, cookie=cookie)
        finally:
            stop.set()
            flooder.join(60)
        outcome.floods += reports
    return outcome


def free_socket_budget(needed):
    """Raise this process's open-file limit to fit `needed` more sockets (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed + 1024))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want



@dataclass
class IdleRound:
    opened: int
    open_s: float  # to open them all
    peak_connections: int  # established on the server once they were open
    dropped_s: float | None  # from the last one opened until the server held only the healthy socket
    all_closed: bool  # every silent socket saw the server end it
    rss_peak: int
    rss_after: int


@dataclass
class IdleOutcome:
    rss_before: int
    rounds: list = field(default_factory=list)
    healthy_answered: bool = False  # the customer who answered pings kept the socket and still chats

    def passed(self, *, grace, rss_growth):
        return (
            self.healthy_answered
            and all(r.dropped_s is not None and r.dropped_s <= grace and r.all_closed for r in self.rounds)
            and self.rounds[-1].rss_after - self.rounds[0].rss_after < rss_growth
        )

    def summary(self):
        first, last = self.rounds[0], self.rounds[-1]
        drops = ", ".join(f"{r.dropped_s:.1f}" if r.dropped_s is not None else "never" for r in self.rounds)
        return (
            f"{len(self.rounds)} rounds of {first.opened} silent sockets + a dead peer (opened in {first.open_s:.1f} s, "
            f"{first.peak_connections} held at once): all dropped {drops} s after the last opened; healthy idle customer "
            f"{'kept its socket' if self.healthy_answered else 'LOST'}; server RSS {self.rss_before / 1e6:.0f} MB before, "
            f"peak +{(first.rss_peak - self.rss_before) / 1e6:.1f} MB ({(first.rss_peak - self.rss_before) / first.opened / 1e3:.0f} kB/socket), "
            f"after round 1 {first.rss_after / 1e6:.0f} MB, after round {len(self.rounds)} {last.rss_after / 1e6:.0f} MB "
            f"({(last.rss_after - first.rss_after) / 1e6:+.1f} MB)"
        )


def silent_sockets_dropped(base_url, pid, port, *, count, rounds, question, cookie=None, grace=10.0):
    """`rounds` times: a dead peer (sends a message, never reads again) and `count` silent sockets
    open while one healthy idle customer answers pings; wait until the server (process `pid`,
    listening on `port`) has dropped all but the healthy one, and follow its memory."""
    healthy = ChatClient(base_url, cookie=cookie)
    stop, lost = threading.Event(), []

    def keep_alive():  # reading answers the server's pings
        while not stop.is_set():
            try:
                healthy.receive(0.5)
            except Closed as closed:
                lost.append(closed.code)
                return

    pinger = threading.Thread(target=keep_alive, daemon=True)
    pinger.start()
    outcome = IdleOutcome(rss_before=server_rss(pid))
    for _ in range(rounds):
        dead = ChatClient(base_url, cookie=cookie)
        dead.send({"type": "message", "text": question, "conversation": None})
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # in parallel: hold them all at once
            clients = list(pool.map(lambda _: ChatClient(base_url, cookie=cookie, timeout=10), range(count)))
        open_s = time.monotonic() - started
        peak, rss_peak = server_connections(pid, port), server_rss(pid)
        dropped = wait_until(lambda: server_connections(pid, port) <= 1, timeout=grace + 30)
        all_closed = all(peer_closed(c.socket.sock) for c in [*clients, dead])
        for client in [*clients, dead]:
            client.socket.shutdown()
        time.sleep(1)  # the server forgets the closed sockets' application instances
        outcome.rounds.append(IdleRound(count, open_s, peak, dropped, all_closed, rss_peak, server_rss(pid)))
    stop.set()
    pinger.join(5)
    try:
        outcome.healthy_answered = not lost and healthy.ask(question, hang_after=30).done is not None
    except Closed:
        outcome.healthy_answered = False
    healthy.close()
    return outcome


@dataclass
class ActivationOutcome:
    answers: int
    before: int  # started before the activation was committed (must be the old version)
    after: int  # started over `window` s after it (must be the new version)
    crossing: int  # started before, finished after: in flight across the activation
    wrong_version: int  # before / after answers on the wrong version
    switched_midway: int  # answers whose done frame names another version than their start frame
    errors: int
    hangs: int
    busy: int
    closed: int

    @property
    def passed(self):
        return (
            self.before > 0 and self.after > 0 and self.crossing > 0
            and self.wrong_version == self.switched_midway == self.errors == self.hangs == self.closed == 0
        )

    def summary(self):
        return (
            f"{self.answers} answers: {self.before} started before the activation, {self.crossing} of them still "
            f"streaming across it, {self.after} started after; {self.wrong_version} on the wrong version, "
            f"{self.switched_midway} switched mid-answer, {self.errors} errors, {self.hangs} hangs, {self.busy} busy"
        )


def activation_outcome(report, *, activated_at, old, new, window=1.0):
    """Check a chat_load during which version `new` replaced `old` at `activated_at` (monotonic,
    after the commit); the server checks the active version every 0.5 s, hence `window`."""
    started = report.started
    before = [e for e in started if e.sent_at + e.reply_s < activated_at]
    after = [e for e in started if e.sent_at > activated_at + window]
    return ActivationOutcome(
        answers=len(started),
        before=len(before),
        after=len(after),
        crossing=sum(1 for e in before if e.ended_at is not None and e.ended_at > activated_at),
        wrong_version=sum(e.adapter != old for e in before) + sum(e.adapter != new for e in after),
        switched_midway=sum(1 for e in started if e.done is not None and e.done.get("adapter") != e.adapter),
        errors=len(report.errors),
        hangs=len(report.hangs),
        busy=sum(e.reply == "busy" for e in report.exchanges),
        closed=len(report.closed) + len(report.connect_failures),
    )
