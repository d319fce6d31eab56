"""REST API of the review queue (mounted under /api/v1/review-queue/): list the answers to review,
turn one into a draft Q&A pair, or dismiss it. Thin: the workflows are chat.review's."""

from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.fields import get_error_detail
from rest_framework.response import Response

from chat.models import ReviewItem
from chat.review import review_dismiss, review_draft_pair
from chat.review_serializers import DraftFromAnswerSerializer, ReviewItemSerializer
from csplatform.permissions import StaffModelPermissions
from knowledge.serializers import QAPairSerializer


class ReviewPermissions(StaffModelPermissions):
    """Reading the queue needs view_reviewitem; drafting a pair also needs add_qapair."""

    perms_map = {**StaffModelPermissions.perms_map, "POST": ["%(app_label)s.change_%(model_name)s"]}

    def has_permission(self, request, view):
        if not super().has_permission(request, view):
            return False
        return view.action != "draft" or request.user.has_perm("knowledge.add_qapair")


@extend_schema(tags=["review queue"])
@extend_schema_view(
    list=extend_schema(
        summary="List answers to review",
        description="Answers rated 👎 or flagged by staff. `review`: waiting (default), drafted, dismissed or all.",
        parameters=[
            OpenApiParameter(
                "review", str, enum=["waiting", "drafted", "dismissed", "all"], description="Which answers to list."
            )
        ],
    ),
    retrieve=extend_schema(summary="Show one answer to review"),
)
class ReviewItemViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = ReviewItem.objects.select_related("adapter_version").prefetch_related("draft_pairs")
    serializer_class = ReviewItemSerializer
    permission_classes = [ReviewPermissions]
    lookup_value_regex = "[^/]+"
    filter_backends = []
    REVIEW = {"waiting": ReviewItem.ReviewStatus.PENDING, "drafted": ReviewItem.ReviewStatus.DRAFTED, "dismissed": ReviewItem.ReviewStatus.DISMISSED}

    def get_queryset(self):
        items = super().get_queryset()
        if self.action != "list":
            return items
        review = self.request.query_params.get("review", "waiting")
        if review == "all":
            return items
        if review not in self.REVIEW:
            raise ValidationError({"review": [_("Use one of: waiting, drafted, dismissed, all.")]})
        return items.filter(review_status=self.REVIEW[review])

    @extend_schema(
        summary="Turn an answer into a draft Q&A pair",
        description=(
            "Creates a draft pair (source: feedback) from the customer's question and your corrected answer, "
            "linked to the answer, which leaves the queue. Approve the pair to train on it."
        ),
        request=DraftFromAnswerSerializer,
        responses={201: QAPairSerializer},
    )
    @action(detail=True, methods=["post"])
    def draft(self, request, pk=None):
        item = self.get_object()
        params = DraftFromAnswerSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            pair = review_draft_pair(answer=item, user=request.user, **params.validated_data)
        except DjangoValidationError as exc:
            raise ValidationError(get_error_detail(exc)) from None
        return Response(QAPairSerializer(pair).data, status=status.HTTP_201_CREATED)

    @extend_schema(summary="Dismiss an answer (no pair needed)", request=None, responses={200: ReviewItemSerializer})
    @action(detail=True, methods=["post"])
    def dismiss(self, request, pk=None):
        item = self.get_object()
        review_dismiss(answers=ReviewItem.objects.filter(pk=item.pk), user=request.user)
        item.refresh_from_db()
        return Response(ReviewItemSerializer(item).data)
