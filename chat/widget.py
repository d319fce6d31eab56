"""The chat widget's page (/widget/): the chat page, compact, inside the frame that
static/csp/widget.js draws on other sites (docs/widget.md).

Only the platform itself and the origins of CSP_WIDGET_ORIGINS may frame it: the page sends
`Content-Security-Policy: frame-ancestors 'self' <origins>` instead of X-Frame-Options, which every
other page keeps at DENY. The frame is the platform's own origin, so its websocket passes the
strict Origin check and its session cookie and storage are the platform's.

widget.js passes the embedding page's options in the query string: `origin` (the page's origin,
the only one the frame posts messages to, and only if it may frame the page), `title`, `greeting`,
`color` and `lang`.
"""

import re

from django.conf import settings
from django.shortcuts import render
from django.utils import translation
from django.views.decorators.clickjacking import xframe_options_exempt
from django.views.decorators.http import require_safe

from chat.views import chat_config

COLOR = re.compile(r"#(?:[0-9a-fA-F]{3}){1,2}")
# Longer options are cut: they are shown in a small panel, not stored.
TITLE_MAX_CHARS = 80
GREETING_MAX_CHARS = 500


def frame_ancestors():
    """The Content-Security-Policy that lets the platform and CSP_WIDGET_ORIGINS frame the widget."""
    return " ".join(["frame-ancestors", "'self'", *settings.CSP_WIDGET_ORIGINS])


def parent_origin(request):
    """The embedding page's origin as widget.js names it, if that origin may frame the widget;
    else None (the frame then posts no messages at all)."""
    origin = request.GET.get("origin", "").lower()
    own = f"{request.scheme}://{request.get_host()}".lower()
    return origin if origin == own or origin in settings.CSP_WIDGET_ORIGINS else None


@xframe_options_exempt
@require_safe
def widget_page(request):
    language = request.GET.get("lang", "")
    if language in dict(settings.LANGUAGES):
        translation.activate(language)  # LocaleMiddleware sends Content-Language from this
        request.LANGUAGE_CODE = language
    config = chat_config(request)
    config["parentOrigin"] = parent_origin(request)
    config["wsPath"] += f"?lang={translation.get_language()}"  # server-made texts in the page's language
    color = request.GET.get("color", "")
    context = {
        "chat_config": config,
        "max_chars": settings.CSP_CHAT_MAX_MESSAGE_CHARS,
        "widget_title": request.GET.get("title", "").strip()[:TITLE_MAX_CHARS],
        "widget_greeting": request.GET.get("greeting", "").strip()[:GREETING_MAX_CHARS],
        "widget_color": color if COLOR.fullmatch(color) else "",
    }
    response = render(request, "chat/widget.html", context)
    response["Content-Security-Policy"] = frame_ancestors()
    return response
