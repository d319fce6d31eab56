"""REST API routes of the training pipeline (mounted under /api/v1/)."""

from django.urls import path
from rest_framework.routers import DefaultRouter

from training import views
from training.compare_views import VersionComparisonView

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("training-runs", views.TrainingRunViewSet, basename="trainingrun")
router.register("adapter-versions", views.AdapterVersionViewSet, basename="adapterversion")

urlpatterns = [
    # Before the router's routes, where "compare" would be read as a version's id.
    path("adapter-versions/compare/", VersionComparisonView.as_view(), name="adapterversion-compare"),
    *router.urls,
]
