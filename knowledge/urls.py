"""REST API routes of the knowledge base (mounted under /api/v1/)."""

urlpatterns = []
