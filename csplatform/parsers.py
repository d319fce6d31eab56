"""JSON parsing that refuses deep nesting with a clear message instead of a RecursionError.

Python's json module recurses once per nested array or object, so a body of 1 000 `[` (2 kB)
raises RecursionError, which is no ValueError: DRF, the import and the websocket consumer
would each turn it into a 500 or a dead socket. Every place that parses JSON from outside
(request bodies, import files, websocket frames, /v1) calls loads_json, which counts the
nesting first and raises JSONNestingError, a ValueError, past MAX_JSON_DEPTH.
"""

import codecs
import json
import re

from django.utils.translation import gettext as _
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser, get_encoding

# Our deepest legitimate document is a /v1 request (body > messages > message > content part
# > image_url: 5 levels); 100 leaves room for any client and stays far below the ~1 000 frames
# at which the C scanner gives up.
MAX_JSON_DEPTH = 100

# A string (escapes included, so a quoted bracket or \" does not count) or a bracket. Strings
# are matched whole so the brackets inside them are skipped.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class JSONNestingError(ValueError):
    """The document nests arrays/objects deeper than the limit; nothing was parsed."""

    def __init__(self, limit=MAX_JSON_DEPTH):
        self.limit = limit
        super().__init__(
            _("The JSON nests arrays or objects more than %(limit)s levels deep.") % {"limit": limit}
        )


def json_depth_check(text, limit=MAX_JSON_DEPTH):
    """Raise JSONNestingError when text nests deeper than limit; stops at the first excess."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8", errors="replace")
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        char = match.group()[0]
        if char in "[{":
            depth += 1
            if depth > limit:
                raise JSONNestingError(limit)
        elif char in "]}":
            depth -= 1


def loads_json(text, *, limit=MAX_JSON_DEPTH, **kwargs):
    """json.loads for untrusted text: JSONNestingError (a ValueError) past `limit` levels.

    Other malformed input raises what json.loads raises (JSONDecodeError, or ValueError for
    an integer of more than 4 300 digits): callers catch ValueError for all of them.
    """
    json_depth_check(text, limit)
    return json.loads(text, **kwargs)


def _strict_constant(name):
    raise ValueError(_("%(value)s is not a JSON number.") % {"value": name})


class DepthLimitedJSONParser(JSONParser):
    """DRF's JSONParser through loads_json: a deep or malformed body is a 400 ParseError."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = get_encoding(parser_context or {})
        try:
            text = codecs.getreader(encoding)(stream).read()
            return loads_json(text, parse_constant=_strict_constant if self.strict else None)
        except JSONNestingError as exc:
            raise ParseError(str(exc)) from None
        except ValueError as exc:  # UnicodeDecodeError is one too
            raise ParseError(_("JSON parse error - %(error)s") % {"error": exc}) from None
