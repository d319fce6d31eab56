"""REST chat routes (mounted under /api/v1/). The OpenAI-compatible routes are chat.openai_views.urlpatterns (/v1/)."""

from django.urls import path
from rest_framework.routers import DefaultRouter

from chat import api_views, review_views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("chat/conversations", api_views.ConversationViewSet, basename="conversation")
router.register("chat/messages", api_views.MessageViewSet, basename="message")
router.register("review-queue", review_views.ReviewItemViewSet, basename="reviewitem")

urlpatterns = [path("chat/", api_views.ChatView.as_view(), name="chat"), *router.urls]
