"""REST API of the knowledge base: Q&A pairs (with import and export) and categories.

Views are thin: the serializer validates through the model, import and export are the
services the admin and the management commands call too.
"""

from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Count
from django.http import HttpResponse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.fields import get_error_detail
from rest_framework.parsers import MultiPartParser
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from csplatform.permissions import StaffModelPermissions
from knowledge import formats, services
from knowledge.models import Category, QAPair
from knowledge.serializers import (
    AlternateAddSerializer,
    CategorySerializer,
    ExportQuerySerializer,
    ExportRecordSerializer,
    ImportReportSerializer,
    ImportRequestSerializer,
    QAPairSerializer,
)

# --- Permissions ---


class ImportPermissions(StaffModelPermissions):
    # An import both creates pairs and updates the ones it finds again.
    perms_map = {
        **StaffModelPermissions.perms_map,
        "POST": ["%(app_label)s.add_%(model_name)s", "%(app_label)s.change_%(model_name)s"],
    }


class ChangePermissions(StaffModelPermissions):
    # Adding an alternate question changes a pair; it creates none.
    perms_map = {**StaffModelPermissions.perms_map, "POST": ["%(app_label)s.change_%(model_name)s"]}


# --- Filters ---


class QAPairFilter(filters.FilterSet):
    category = filters.CharFilter(field_name="category__name", help_text=_("The category's name."))
    created_at_after = filters.IsoDateTimeFilter(
        field_name="created_at", lookup_expr="gte", help_text=_("Created at or after this time (ISO 8601).")
    )
    created_at_before = filters.IsoDateTimeFilter(
        field_name="created_at", lookup_expr="lte", help_text=_("Created at or before this time (ISO 8601).")
    )

    class Meta:
        model = QAPair
        fields = ["status", "split", "source", "category", "created_at_after", "created_at_before"]


# --- Views ---


class FileDownloadNegotiation(BaseContentNegotiation):
    """The export answers with its file's own content type whatever the Accept header says;
    only its errors are rendered, and those as JSON."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


@extend_schema(tags=["qa-pairs"])
@extend_schema_view(
    list=extend_schema(summary="List Q&A pairs", description="Filter, search and order; paginated."),
    retrieve=extend_schema(summary="Show a Q&A pair"),
    create=extend_schema(summary="Add a Q&A pair", description="Stored with source `manual`."),
    update=extend_schema(summary="Replace a Q&A pair"),
    partial_update=extend_schema(summary="Change a Q&A pair"),
    destroy=extend_schema(summary="Delete a Q&A pair"),
)
class QAPairViewSet(viewsets.ModelViewSet):
    queryset = QAPair.objects.select_related("category", "created_by", "updated_by")
    serializer_class = QAPairSerializer
    permission_classes = [StaffModelPermissions]
    filterset_class = QAPairFilter
    # Any path segment reaches the view, so a malformed id is a JSON 404 like an unknown one.
    lookup_value_regex = "[^/]+"
    search_fields = ["instruction", "output", "alternates"]
    ordering_fields = ["id", "created_at", "updated_at", "status"]

    # API writes land in the admin history too, like the admin's own changes.
    def perform_create(self, serializer):
        user = self.request.user
        pair = serializer.save(source=QAPair.Source.MANUAL, created_by=user, updated_by=user)
        LogEntry.objects.log_actions(user.pk, [pair], ADDITION, change_message=_("Added through the API."))

    def perform_update(self, serializer):
        pair = serializer.save(updated_by=self.request.user)
        LogEntry.objects.log_actions(self.request.user.pk, [pair], CHANGE, change_message=_("Changed through the API."))

    def perform_destroy(self, instance):
        LogEntry.objects.log_actions(self.request.user.pk, [instance], DELETION, change_message=_("Deleted through the API."))
        instance.delete()

    @extend_schema(
        summary="Import a file of Q&A pairs",
        description=(
            "All or nothing: when the file or any row is bad nothing is written and the report "
            "names each bad row and field. 201 when written, 200 for a clean dry run."
        ),
        request=ImportRequestSerializer,
        responses={
            201: OpenApiResponse(ImportReportSerializer, description="Every row was acceptable and is written."),
            200: OpenApiResponse(ImportReportSerializer, description="A dry run found every row acceptable."),
            400: OpenApiResponse(
                ImportReportSerializer, description="The file or a row is bad (nothing was written), or a bad request."
            ),
        },
    )
    @action(
        detail=False,
        methods=["post"],
        url_path="import",
        parser_classes=[MultiPartParser],
        permission_classes=[ImportPermissions],
    )
    def import_file(self, request):
        params = ImportRequestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        upload = params.validated_data["file"]
        report = services.qa_import(
            content=upload.read(),
            filename=upload.name,
            file_format=params.validated_data.get("format"),
            status=params.validated_data.get("status"),
            split=params.validated_data.get("split"),
            user=request.user,
            dry_run=params.validated_data["dry_run"],
        )
        if report.committed:
            code = status.HTTP_201_CREATED
        elif report.ok:
            code = status.HTTP_200_OK
        else:
            code = status.HTTP_400_BAD_REQUEST
        return Response(report.as_dict(), status=code)

    @extend_schema(
        summary="Export Q&A pairs as a file",
        description="Takes the list's filters; the file imports back unchanged.",
        parameters=[ExportQuerySerializer],
        responses={
            (200, "application/json"): OpenApiResponse(
                ExportRecordSerializer(many=True), description="The file, in file_format, as an attachment."
            ),
            (200, "application/x-ndjson"): OpenApiTypes.BINARY,
            (200, "text/csv"): OpenApiTypes.BINARY,
        },
    )
    @action(
        detail=False,
        methods=["get"],
        url_path="export",
        pagination_class=None,  # the file holds every matching pair
        renderer_classes=[JSONRenderer],
        content_negotiation_class=FileDownloadNegotiation,
    )
    def export(self, request):
        # A plain dict, so an empty file_format is refused rather than read as "use the default".
        params = ExportQuerySerializer(data=request.query_params.dict())
        params.is_valid(raise_exception=True)
        file_format = params.validated_data["file_format"]
        content = services.qa_export(pairs=self.filter_queryset(self.get_queryset()), file_format=file_format)
        response = HttpResponse(content, content_type=formats.CONTENT_TYPES[file_format])
        filename = f"qa-pairs-{timezone.localdate():%Y%m%d}.{file_format}"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response

    @extend_schema(
        summary="Add a customer's question as an alternate question",
        description=(
            "Teaches the pair a paraphrase (相似问法): the next customer who asks it so is matched to this "
            "pair. 200 with the pair, also when it already asks the question (then nothing changes); 400 "
            "when the question is empty, too long, one too many, or another pair's question or alternate "
            "(the message names that pair)."
        ),
        request=AlternateAddSerializer,
        responses={
            200: QAPairSerializer,
            400: OpenApiResponse(description="The question cannot be added: `question`'s messages say why."),
        },
    )
    @action(detail=True, methods=["post"], url_path="alternates", permission_classes=[ChangePermissions])
    def alternates(self, request, pk=None):
        pair = self.get_object()
        params = AlternateAddSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            pair = services.qa_alternate_add(pair=pair, question=params.validated_data["question"], user=request.user)
        except DjangoValidationError as exc:
            raise ValidationError(get_error_detail(exc)) from None
        return Response(self.get_serializer(pair).data)


@extend_schema(tags=["categories"])
@extend_schema_view(
    list=extend_schema(summary="List categories"),
    retrieve=extend_schema(summary="Show a category"),
    create=extend_schema(summary="Add a category"),
    update=extend_schema(summary="Replace a category"),
    partial_update=extend_schema(summary="Change a category"),
    destroy=extend_schema(summary="Delete a category", description="Its pairs are kept, without a category."),
)
class CategoryViewSet(viewsets.ModelViewSet):
    # Meta.ordering does not apply to a GROUP BY query, so order again.
    queryset = Category.objects.annotate(pair_count=Count("pairs")).order_by("name")
    serializer_class = CategorySerializer
    permission_classes = [StaffModelPermissions]
    lookup_value_regex = "[^/]+"
    search_fields = ["name", "description"]
    ordering_fields = ["id", "name", "pair_count"]

