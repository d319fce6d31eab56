"""REST API routes of the knowledge base (mounted under /api/v1/)."""

from rest_framework.routers import DefaultRouter

from knowledge import views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("qa-pairs", views.QAPairViewSet, basename="qapair")
router.register("categories", views.CategoryViewSet, basename="category")

urlpatterns = router.urls
