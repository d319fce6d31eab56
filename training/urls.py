"""REST API routes of the training pipeline (mounted under /api/v1/)."""

from rest_framework.routers import DefaultRouter

from training import views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("training-runs", views.TrainingRunViewSet, basename="trainingrun")
router.register("adapter-versions", views.AdapterVersionViewSet, basename="adapterversion")

urlpatterns = router.urls
