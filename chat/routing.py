"""Websocket routes; the chat consumer is added by the serving work (issue 4)."""

websocket_urlpatterns = []
