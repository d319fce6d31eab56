"""REST API of the training pipeline: runs (start, cancel) and adapter versions (activate, roll back)."""

from django.utils.translation import gettext as _
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from csplatform.permissions import StaffModelPermissions
from training import services
from training.models import AdapterVersion, TrainingRun
from training.serializers import AdapterVersionSerializer, TrainingRefusedSerializer, TrainingRunSerializer, TrainingRunStartSerializer

REFUSAL_STATUS = {
    "busy": status.HTTP_409_CONFLICT,
    "base_model": status.HTTP_503_SERVICE_UNAVAILABLE,
    "storage": status.HTTP_507_INSUFFICIENT_STORAGE,
}


class ChangePermission(StaffModelPermissions):
    """Actions that change a record (cancel, activate) need the change_ permission, whatever the method."""

    perms_map = {**StaffModelPermissions.perms_map, "POST": ["%(app_label)s.change_%(model_name)s"]}


class TrainingRunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet):
    queryset = TrainingRun.objects.select_related("snapshot", "created_by", "adapter").order_by("-created_at")
    serializer_class = TrainingRunSerializer
    permission_classes = [StaffModelPermissions]
    filterset_fields = ["status"]
    ordering_fields = ["created_at", "status"]
    search_fields = []

    def get_permissions(self):
        if self.action in ("cancel", "resume"):
            return [ChangePermission()]
        return super().get_permissions()

    @extend_schema(
        request=TrainingRunStartSerializer,
        responses={
            201: TrainingRunSerializer,
            400: OpenApiResponse(
                TrainingRefusedSerializer,
                description="The approved pairs failed the checks (`code` checks); or invalid hyper-parameters (field -> messages).",
            ),
            409: OpenApiResponse(description="A run is already queued or running."),
            503: OpenApiResponse(description="The base model (CSP_BASE_MODEL) is not available."),
            507: OpenApiResponse(description="The snapshot of the approved pairs could not be written (disk full)."),
        },
    )
    def create(self, request, *args, **kwargs):
        params = TrainingRunStartSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            run = services.training_run_start(user=request.user, hyperparameters=params.validated_data)
        except services.TrainingRefused as exc:
            body = {"detail": str(exc), "code": exc.code, **({"checks": exc.details} if exc.code == "checks" else {})}
            if exc.code == "invalid":
                body = exc.details | {"detail": str(exc)}
            return Response(body, status=REFUSAL_STATUS.get(exc.code, status.HTTP_400_BAD_REQUEST))
        return Response(TrainingRunSerializer(run).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: TrainingRunSerializer, 409: OpenApiResponse(description="The run has already ended.")})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        run = self.get_object()
        if not services.training_run_cancel(run=run):
            return Response({"detail": _("The run has already ended.")}, status=status.HTTP_409_CONFLICT)
        return Response(TrainingRunSerializer(run).data)

    @extend_schema(
        request=None,
        responses={200: TrainingRunSerializer, 409: OpenApiResponse(description="Not a failed or interrupted run with a checkpoint, or another run is active.")},
    )
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        run = self.get_object()
        try:
            resumed = services.training_run_resume(run=run)
        except services.TrainingRefused as exc:
            return Response({"detail": str(exc), "code": exc.code}, status=status.HTTP_409_CONFLICT)
        if not resumed:
            return Response({"detail": _("Only a failed or interrupted run with a checkpoint can be resumed.")}, status=status.HTTP_409_CONFLICT)
        return Response(TrainingRunSerializer(run).data)


class AdapterVersionViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = AdapterVersion.objects.select_related("base_model", "run").order_by("-created_at")
    serializer_class = AdapterVersionSerializer
    permission_classes = [StaffModelPermissions]
    filterset_fields = ["is_active"]
    ordering_fields = ["created_at", "name"]
    search_fields = ["name"]

    def get_permissions(self):
        if self.action in ("activate", "rollback"):
            return [ChangePermission()]
        return super().get_permissions()

    @extend_schema(request=None, responses={200: AdapterVersionSerializer, 409: OpenApiResponse(description="Refused by CSP_EVAL_GATE=strict.")})
    @action(detail=True, methods=["post"])
    def activate(self, request, pk=None):
        version = self.get_object()
        try:
            worse = services.adapter_version_activate(version=version)
        except services.ActivationRefused as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        version.refresh_from_db()
        return Response({**AdapterVersionSerializer(version).data, "worse_on": worse})

    @extend_schema(request=None, responses={200: AdapterVersionSerializer, 409: OpenApiResponse(description="No previous version.")})
    @action(detail=False, methods=["post"])
    def rollback(self, request):
        previous = services.adapter_version_rollback()
        if previous is None:
            return Response({"detail": _("There is no previously active version.")}, status=status.HTTP_409_CONFLICT)
        return Response(AdapterVersionSerializer(previous).data)
