"""Page routes of the chat app (mounted at the site root by csplatform/urls.py)."""

from django.urls import path

from chat import views, widget

urlpatterns = [
    path("", views.chat_page, name="home"),
    path("chat/", views.chat_page, name="chat"),
    path("widget/", widget.widget_page, name="widget"),  # the embeddable widget's frame (docs/widget.md)
]
