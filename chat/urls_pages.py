"""Page routes of the chat app (mounted at the site root by csplatform/urls.py)."""

from django.urls import path

from chat import views

urlpatterns = [
    path("", views.chat_page, name="home"),
    path("chat/", views.chat_page, name="chat"),
]
