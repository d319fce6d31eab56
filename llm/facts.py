"""The fact guard: a generated answer states no number, amount, duration, date, phone number,
URL or e-mail that its sources do not hold.

A small model grounded on retrieved pairs still invents figures ("30天内" where the pair says
7天). Those are exactly the parts of an answer a customer acts on, so serving checks them while
the answer streams:

    guard = FactGuard([*retrieved_answers, *customer_messages])
    for piece in pieces:
        shown = guard.feed(piece)          # "" while a fact may still be in progress
        if guard.violation:
            break                          # replace the answer; the invented fact was never sent
    shown = guard.finish()                 # the held tail, checked

What counts as a fact (`extract_facts`):
- number: any Arabic number (full-width digits and thousands separators normalised, "2万" is
  20000); a percentage ("20%", "百分之二十") keeps its "%".
- amount: a number with a currency (元/块/块钱/人民币/RMB/CNY/¥, 美元/USD/$): "99元" = "99.00元"
  = "¥99" = "RMB99".
- duration: a number with a time unit (个工作日/工作日, 天/日, 小时, 分钟, 秒, 周/星期, 个月/月, 年,
  and English days/hours/...). Units are not converted: "半小时" is 0.5 hour, not 30 minutes,
  and "7个工作日" is not "7天".
- date: 2026-12-07, 2026/12/07, 2026.12.07, 2026年12月7日, 12月7日/号, 12/7 (month/day),
  2026年12月, a year ("2026年"), and clock times ("9:00"). A source date with a year also
  supports the same date written without it.
- phone: mainland mobiles (11 digits), 400/800 numbers and landlines, with spaces, dashes or
  +86; compared by digits.
- url: with or without scheme, "www." or a well-known top-level domain; compared by lowercased
  host (without "www.") and path.
- email: compared lowercased.
A range ("1-3个工作日", "三到五天") gives a fact for each end, both with the unit.

Chinese numerals ("七天", "十五天", "两个工作日", "一百元", "半小时") are the same facts as their
digits, but only where they count something: followed by a unit above, a percentage, or a
counter (个/次/期/倍/张/...). A lone 一 or 二 before a counter is the article or an ordinal
("一个订单", "一次性", "二次销售") and no fact, and numeral words without a unit ("一般", "十分",
"千万", "统一") are none either.

Not facts: list markers and step numbers, so an answer that renumbers or adds steps passes. A
marker is a number of one or two digits at the start of a line or after sentence punctuation
(：；。！？ or ". "), alone in its run and written "1." / "1．" / "1、" / "1)" / "（1）"; a step
number is "第N步" or follows "步骤"/"Step"; "[1]" is a reference number. Any other number,
also "1.5倍" at the start of a line, is a fact.

Supported (the brief's rule): a fact is supported when a source has a fact with the same key; a
number with a unit is also supported by the same value written bare in a source ("7天" by "7",
never by "7元"); a bare number by the same value with any unit ("7" by "7天").

Streaming without look-ahead guesses: the text is cut into runs, maximal stretches of characters
a fact can be made of (digits, numerals, letters, currency signs, unit characters and joiners
like ".-/:@%"; a space only after a digit or currency sign). A run starts at a digit, numeral,
currency sign or Latin letter (an e-mail's local part or "http" may be starting) and ends at the
first character that cannot continue it. Every fact lies inside one run, and a run's facts depend
only on the run, the 16 characters before it and the character after it, so `extract_facts` and
the guard cut and read the same runs: the guard holds each run until it ended and releases it
once its facts are supported. Each character is looked at once and each run parsed once, so the
guard is O(n) in the answer. Pure Python: no Django, no torch.
"""

import re
import string
from dataclasses import dataclass
from decimal import Decimal

NUMBER = "number"
AMOUNT = "amount"
DURATION = "duration"
DATE = "date"
PHONE = "phone"
URL = "url"
EMAIL = "email"
KINDS = (NUMBER, AMOUNT, DURATION, DATE, PHONE, URL, EMAIL)

_CONTEXT = 16  # characters before a run its facts may depend on (the list-marker rule)


@dataclass(frozen=True)
class Fact:
    kind: str  # one of KINDS
    text: str  # the span as written
    key: str  # normalised comparison key: "7 day" for 7天/七天/７天, "99 CNY", "--12-07", "4008201234"
    start: int
    end: int


# --- characters --------------------------------------------------------------------------------

# Full-width ASCII (ＡＢＣ１２３．，％) and a few look-alikes compare as their ASCII forms;
# one character each way, so positions in the normalised text are positions in the text.
_NARROW = {chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)}
_NARROW.update({"\u3000": " ", "\u00a0": " ", "\uffe5": "¥", "\u2013": "-", "\u301c": "~"})
del _NARROW["，"]  # the Chinese comma ends a fact ("7天，"); only "," separates thousands

_DIGITS = frozenset("0123456789")
_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000}
_CN_BIG = {"万": 10**4, "亿": 10**8}
_CN_NUMERALS = frozenset(_CN_DIGITS) | frozenset(_CN_UNITS) | frozenset(_CN_BIG)
_CURRENCY = frozenset("¥$")
# What may start a run, and what else may continue one (with a space after a digit or currency).
_STARTERS = _DIGITS | _CN_NUMERALS | _CURRENCY | frozenset("半+") | frozenset(string.ascii_letters)
_JOINERS = frozenset(".-_/:@%+~#?=&,")
_UNIT_CHARS = frozenset("个工作日小时分钟秒星期月周天年元块钱人民币美号之至到")
_COUNTERS = frozenset("个次期倍张件位台种项笔份单条家名折")
_CONTINUING = _STARTERS | _JOINERS | _UNIT_CHARS  # and a space right after a digit or currency sign
_BEFORE_SPACE = _DIGITS | _CURRENCY


@dataclass(frozen=True)
class _Run:
    start: int  # offset of its first character in the text
    before: str  # up to _CONTEXT normalised characters before it ("\n" stands for the text's start)
    text: str  # as written
    norm: str  # normalised (_NARROW), same length
    after: str  # the normalised character that ended it ("" at the end of the text)


class _Runs:
    """Cuts text into runs (the same cut for a whole text and for a stream in any pieces)."""

    def __init__(self):
        self.offset = 0  # characters taken
        self.context = "\n"  # the normalised text up to the gap, its last _CONTEXT characters
        self.gap = []  # normalised characters since the last run (at most a few dozen kept)
        self.start = None  # the open run's offset, None while no run is open
        self.before = ""
        self.chars = []
        self.norm = []

    def take(self, text):
        """Take more text: a list of plain text (str, outside any run) and the runs (_Run) it
        ended, in order. A run still open at its end is kept for the next call or close()."""
        items, plain = [], []
        for char in text:
            n = _NARROW.get(char, char)
            if self.start is not None:
                if n in _CONTINUING or (n == " " and self.norm[-1] in _BEFORE_SPACE):
                    self.chars.append(char)
                    self.norm.append(n)
                    self.offset += 1
                    continue
                items.append(self.close(after=n))
            if n in _STARTERS:
                if plain:
                    items.append("".join(plain))
                    plain = []
                self.context = (self.context + "".join(self.gap))[-_CONTEXT:]
                self.start, self.before, self.gap = self.offset, self.context, []
                self.chars.append(char)
                self.norm.append(n)
            else:
                plain.append(char)
                self.gap.append(n)
                if len(self.gap) > 4 * _CONTEXT:
                    del self.gap[: -_CONTEXT]
            self.offset += 1
        if plain:
            items.append("".join(plain))
        return items

    def close(self, after=""):
        """End the open run (at the end of the text, or at the character `after`)."""
        if self.start is None:
            return None
        run = _Run(self.start, self.before, "".join(self.chars), "".join(self.norm), after)
        self.context = (self.before + run.norm)[-_CONTEXT:]
        self.start, self.chars, self.norm = None, [], []
        return run


# --- Chinese numerals --------------------------------------------------------------------------

_HALF_UNIT = re.compile(r"个?(?:小时|天|日|年|月|周|星期|分钟)")


def _cn_value(numeral):
    """The integer a Chinese numeral writes, or None where it is no number ("千万", "万一", "三五")."""
    if not numeral or numeral[0] in "百千万亿":
        return None
    if not any(c in _CN_UNITS or c in _CN_BIG for c in numeral):
        if len(numeral) == 1:
            return _CN_DIGITS[numeral]
        # "二〇二六" is digit by digit; two digits ("三五天", "两三天") are an estimate, no fact.
        if len(numeral) >= 3 and "两" not in numeral:
            return int("".join(str(_CN_DIGITS[c]) for c in numeral))
        return None
    total = section = number = 0
    last_unit, previous = 1, ""
    for char in numeral:
        if char in _CN_DIGITS:
            if previous in _CN_DIGITS and _CN_DIGITS[previous]:
                return None  # two digits in a row ("三五百")
            number = _CN_DIGITS[char]
        elif char in _CN_UNITS:
            section += (number or (0 if previous in _CN_DIGITS else 1)) * _CN_UNITS[char]
            number, last_unit = 0, _CN_UNITS[char]
        else:
            total = (total + section + number) * _CN_BIG[char]
            section = number = 0
            last_unit = _CN_BIG[char]
        previous = char
    if numeral[-1] in _CN_DIGITS and len(numeral) > 1 and numeral[-2] in "百千万" and last_unit >= 100:
        number *= last_unit // 10  # "一百五" is 150, "两万五" 25000
    return total + section + number


def _arabic(norm):
    """The run with Chinese numerals written in digits: (text, spans, chinese). spans[i] is the
    (start, end) in the run that character i of text came from; chinese[i] whether a numeral."""
    out, spans, chinese = [], [], []

    def emit(text, start, end, flag):
        out.extend(text)
        spans.extend([(start, end)] * len(text))
        chinese.extend([flag] * len(text))

    i = 0
    while i < len(norm):
        char = norm[i]
        if norm.startswith("百分之", i):
            end = i + 3
            while end < len(norm) and norm[end] in _CN_NUMERALS:
                end += 1
            value = _cn_value(norm[i + 3 : end])
            if value is not None:
                emit(f"{value}%", i, end, True)
                i = end
                continue
        if char in _CN_NUMERALS:
            end = i
            while end < len(norm) and norm[end] in _CN_NUMERALS:
                end += 1
            touching = (out and out[-1] in _DIGITS | {"."}) or (end < len(norm) and norm[end] in _DIGITS)
            value = None if touching else _cn_value(norm[i:end])
            if value is None:  # not a number, the 万 of "2万" (read with the digits), or "周五9:00"
                emit(norm[i:end], i, end, False)
            elif norm.startswith("个半", end) and _HALF_UNIT.match(norm, end + 2):
                emit(f"{value}.5", i, end + 2, True)  # 一个半小时
                end += 2
            else:
                emit(str(value), i, end, True)
            i = end
            continue
        if char == "半" and _HALF_UNIT.match(norm, i + 1):
            emit("0.5", i, i + 1, True)
        else:
            emit(char, i, i + 1, False)
        i += 1
    return "".join(out), spans, chinese


# --- patterns ----------------------------------------------------------------------------------

_UNITS = {
    "个工作日": "workday", "工作日": "workday", "workdays": "workday", "workday": "workday",
    "天": "day", "日": "day", "days": "day", "day": "day",
    "个小时": "hour", "小时": "hour", "hours": "hour", "hour": "hour", "hrs": "hour", "hr": "hour", "h": "hour",
    "分钟": "minute", "minutes": "minute", "minute": "minute", "mins": "minute", "min": "minute",
    "秒钟": "second", "秒": "second", "seconds": "second", "second": "second", "secs": "second", "sec": "second",
    "个星期": "week", "星期": "week", "周": "week", "weeks": "week", "week": "week",
    "个月": "month", "月": "month", "months": "month", "month": "month",
    "年": "year", "years": "year", "year": "year",
    "块钱": "CNY", "元": "CNY", "块": "CNY", "人民币": "CNY", "rmb": "CNY", "cny": "CNY", "yuan": "CNY",
    "美元": "USD", "usd": "USD", "dollars": "USD", "dollar": "USD",
    "%": "%",
}  # fmt: skip
_CURRENCY_UNITS = {"CNY", "USD"}


def _unit_pattern():
    names = sorted(_UNITS, key=len, reverse=True)
    return "|".join(re.escape(n) + ("(?![A-Za-z])" if n.isascii() and n.isalpha() else "") for n in names)


_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[千万亿]{1,2})?"
_QUANTITY = re.compile(
    rf"(?P<cur>¥|\$|(?i:rmb|cny|usd)(?![A-Za-z]))?[ ]?(?P<v1>{_NUM})"
    rf"(?:[ ]?(?P<sep>-|~|至|到)[ ]?(?:¥|\$)?(?P<v2>{_NUM}))?"
    rf"(?:[ -]?(?P<unit>(?i:{_unit_pattern()})))?"
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}")
_URL_CHARS = r"[A-Za-z0-9\-._~:/?#@!$&'*+,;=%]"
_URL = re.compile(rf"(?i:https?://|www\.){_URL_CHARS}{{1,2000}}")
_DOMAIN = re.compile(
    r"[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.(?i:com|cn|net|org|edu|gov|io|co|info|shop|top|xyz|app|me|hk)"
    rf"(?![A-Za-z0-9-])(?:[/?#]{_URL_CHARS}{{0,2000}})?"
)
_PHONE = re.compile(
    r"(?<!\d)(?P<cc>\+?86[ -]?)?(?:1[3-9]\d(?:[ -]?\d{4}){2}|[48]00[ -]?\d{3}[ -]?\d{4}|0\d{2,3}[ -]?\d{7,8})(?!\d)"
)
_DATE = re.compile(
    r"(?<!\d)(?:(?P<y>\d{4})(?:(?P<s>[-/.])(?P<m>\d{1,2})(?P=s)(?P<d>\d{1,2})(?!\d)"  # 2026-12-07
    r"|年(?P<m2>\d{1,2})月(?:(?P<d2>\d{1,2})(?:[日号]|(?!\d)))?)"  # 2026年12月(7日)
    r"|(?P<m3>\d{1,2})月(?P<d3>\d{1,2})[日号]"  # 12月7日
    r"|(?P<m4>\d{1,2})/(?P<d4>\d{1,2})(?![\d/]))"  # 12/7
)
_TIME = re.compile(r"(?<!\d)(?P<h>\d{1,2}):(?P<m>\d{2})(?!\d)")
_LINE_START = re.compile(r"(?:\n|[:;。!?]|\.\s)[ \t*#>]*$")
_STEP = re.compile(r"(?:步骤|(?i:step))[ ]?$")


def _decimal(number):
    number = number.replace(",", "")
    factor = 1
    while number and number[-1] in "千万亿":
        factor *= {"千": 1000, "万": 10**4, "亿": 10**8}[number[-1]]
        number = number[:-1]
    return format((Decimal(number) * factor).normalize(), "f")


def _email(text, pos, run, arabic):
    m = _EMAIL.match(text, pos)
    return m and ([(EMAIL, m.start(), m.end(), m.group().lower())], m.end())


def _url(text, pos, run, arabic):
    m = _URL.match(text, pos) or _DOMAIN.match(text, pos)
    if not m:
        return None
    end = m.start() + len(m.group().rstrip(".,:;?!'"))
    address = re.sub(r"^(?i:https?://)", "", text[m.start() : end])
    cut = re.search(r"[/?#]", address)
    host, path = (address[: cut.start()], address[cut.start() :]) if cut else (address, "")
    host = host.lower().removeprefix("www.")
    return [(URL, m.start(), end, (host + path).rstrip("/"))], end


def _phone(text, pos, run, arabic):
    m = _PHONE.match(text, pos)
    if not m:
        return None
    digits = re.sub(r"\D", "", m.group())
    if m.group("cc"):
        digits = digits[2:]
    return [(PHONE, m.start(), m.end(), digits)], m.end()


def _date(text, pos, run, arabic):
    m = _DATE.match(text, pos)
    if not m:
        return None
    g = m.groupdict()
    year = g["y"]
    month = g["m"] or g["m2"] or g["m3"] or g["m4"]
    day = g["d"] or g["d2"] or g["d3"] or g["d4"]
    if not 1 <= int(month) <= 12 or (day is not None and not 1 <= int(day) <= 31):
        return None
    if year and day:
        key = f"{year}-{int(month):02d}-{int(day):02d}"
    elif year:
        key = f"{year}-{int(month):02d}"
    else:
        key = f"--{int(month):02d}-{int(day):02d}"
    return [(DATE, m.start(), m.end(), key)], m.end()


def _time(text, pos, run, arabic):
    m = _TIME.match(text, pos)
    if not m or int(m["h"]) > 24 or int(m["m"]) > 59:
        return None
    return [(DATE, m.start(), m.end(), f"{int(m['h'])}:{m['m']}")], m.end()


def _is_marker(text, m, run):
    """A list marker, step or reference number: the bare 1–2 digit number alone in its run."""
    before, after, rest = run.before, run.after, text[m.end() :]
    if m.start() != 0 or len(m["v1"]) > 2 or not m["v1"].isdigit():
        return False
    if (before.endswith("第") and after == "步" and rest == "") or _STEP.search(before):
        return True
    if rest == "" and before.endswith("[") and after == "]":
        return True
    if rest.startswith("."):
        return bool(_LINE_START.search(before))
    if rest == "" and after in "、)" and after:
        if before.endswith("("):
            return after == ")" and bool(_LINE_START.search(before[:-1]))
        return bool(_LINE_START.search(before))
    return False


def _quantity(text, pos, run, arabic):
    m = _QUANTITY.match(text, pos)
    if not m:
        return None
    unit = _UNITS[m["unit"].lower()] if m["unit"] else None
    if m["cur"]:
        unit = "USD" if m["cur"].lower() in ("$", "usd") else "CNY"
    spans, chinese = arabic
    if chinese[m.start("v1")] and unit is None:
        # A Chinese numeral counts only before a unit or a counter, and a lone 一 or 二 before a
        # counter is the article or an ordinal (一个订单, 一次性, 二次销售).
        following = text[m.end()] if m.end() < len(text) else run.after
        written = run.norm[spans[m.start("v1")][0] : spans[m.end("v1") - 1][1]]
        if m["v2"] or following not in _COUNTERS or written in ("一", "二"):
            return [], m.end()
    if unit is None and not m["v2"] and _is_marker(text, m, run):
        return [], m.end()
    if m["v2"]:
        ends = [("v1", m.start(), m.end("v1")), ("v2", m.start("v2"), m.end())]
    else:
        ends = [("v1", m.start(), m.end())]
    facts = []
    for group, start, end in ends:
        kind, key = _number_fact(_decimal(m[group]), unit)
        facts.append((kind, start, end, key))
    return facts, m.end()


def _number_fact(value, unit):
    """(kind, key) of a number with its unit (None when bare)."""
    if unit is None:
        return NUMBER, value
    if unit == "%":
        return NUMBER, f"{value}%"
    if unit in _CURRENCY_UNITS:
        return AMOUNT, f"{value} {unit}"
    if unit == "year" and value.isdigit() and 1900 <= int(value) <= 2199:
        return DATE, value
    return DURATION, f"{value} {unit}"


_MATCHERS = (_email, _url, _phone, _date, _time, _quantity)


def _run_facts(run):
    text, spans, chinese = _arabic(run.norm)
    found = []
    pos = 0
    while pos < len(text):
        for matcher in _MATCHERS:
            result = matcher(text, pos, run, (spans, chinese))
            if result:
                facts, pos = result
                found.extend(facts)
                break
        else:
            pos += 1
    facts = []
    for kind, start, end, key in found:
        a, b = spans[start][0], spans[end - 1][1]
        facts.append(Fact(kind, run.text[a:b], key, run.start + a, run.start + b))
    return facts


# --- the public side ---------------------------------------------------------------------------


def extract_facts(text):
    """The facts stated in text, in order (see the module docstring for what counts)."""
    runs = _Runs()
    items = [*runs.take(text), runs.close()]
    return [fact for item in items if isinstance(item, _Run) for fact in _run_facts(item)]


def _value_unit(fact):
    """(value, unit or None) of a number, amount or duration."""
    if fact.kind == NUMBER:
        return (fact.key[:-1], "%") if fact.key.endswith("%") else (fact.key, None)
    value, _, unit = fact.key.partition(" ")
    return value, unit


class _Support:
    """What the sources state, indexed for the support rule."""

    def __init__(self, sources):
        self.keys = set()  # (kind, key), with a dated fact's shorter spellings
        self.values = set()  # every number's value, with or without a unit
        self.bare = set()  # the values of numbers written without a unit
        for source in sources:
            for fact in extract_facts(source or ""):
                self.keys.add((fact.kind, fact.key))
                if fact.kind in (NUMBER, AMOUNT, DURATION):
                    value, unit = _value_unit(fact)
                    self.values.add(value)
                    if unit is None:
                        self.bare.add(value)
                elif fact.kind == DATE and fact.key[:4].isdigit():
                    year, *rest = fact.key.split("-")
                    self.keys.add((DATE, year))
                    self.values.add(year)
                    if rest:
                        self.keys.add((DATE, f"{year}-{rest[0]}"))
                    if len(rest) == 2:
                        self.keys.add((DATE, f"--{rest[0]}-{rest[1]}"))

    def covers(self, fact):
        if (fact.kind, fact.key) in self.keys:
            return True
        if fact.kind in (NUMBER, AMOUNT, DURATION):
            value, unit = _value_unit(fact)
            return value in (self.values if unit is None else self.bare)
        return False


def unsupported(text, sources):
    """The facts of text that no source supports (sources: retrieved answers and the customer's
    messages)."""
    support = _Support(sources)
    return [fact for fact in extract_facts(text) if not support.covers(fact)]


class FactGuard:
    """Checks a generated answer's facts while it streams (see the module docstring).

    feed() returns the text that is safe to show now and holds back a run that may still be or
    become a fact; finish() returns the held tail once the answer ended. Without a violation,
    everything returned concatenated is the answer unchanged. The first unsupported fact is
    `violation`; the call that finds it and every later one return "", so no part of that fact
    (nor anything after it) is shown, and the caller replaces the answer.
    """

    def __init__(self, sources):
        self._support = _Support(sources)
        self._runs = _Runs()
        self.violation = None

    def feed(self, piece):
        if self.violation is not None:
            return ""
        shown = []
        for item in self._runs.take(piece):
            if isinstance(item, _Run):
                if not self._supported(item):
                    return ""
                item = item.text
            shown.append(item)
        return "".join(shown)

    def finish(self):
        if self.violation is not None:
            return ""
        closed = self._runs.close()
        if closed is None or not self._supported(closed):
            return ""
        return closed.text

    def _supported(self, run):
        for fact in _run_facts(run):
            if not self._support.covers(fact):
                self.violation = fact
                self._runs = _Runs()  # drop what was held
                return False
        return True
