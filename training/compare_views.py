"""Two adapter versions compared (training.compare), for staff: the admin page
/admin/training/adapterversion/compare/?a=<id>&b=<id> (add &format=json for its numbers) and the
API's GET /api/v1/adapter-versions/compare/?a=<id>&b=<id>. The version list's action "Compare
the two selected versions" opens the page."""

from django.core.exceptions import PermissionDenied
from django.http import Http404, JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.translation import gettext as _
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from csplatform.permissions import StaffModelPermissions
from training.compare import GOT, OTHER, version_comparison
from training.models import AdapterVersion


class NoSuchVersions(Exception):
    """?a= or ?b= is missing or not a number (`invalid`), or names no version (`absent`)."""

    def __init__(self, message, *, code):
        super().__init__(message)
        self.code = code
        self.status = 400 if code == "invalid" else 404


def chosen_versions(params):
    """The versions ?a=<id>&b=<id> name; raises NoSuchVersions."""
    ids = {side: (params.get(side) or "").strip() for side in ("a", "b")}
    if not all(value.isdecimal() for value in ids.values()):
        raise NoSuchVersions(_("Name two adapter versions by id: ?a=<id>&b=<id>."), code="invalid")
    # One exact lookup each: an id past the database's integer range finds nothing (an IN lookup fails on it).
    versions = AdapterVersion.objects.select_related("run__snapshot")
    found = [versions.filter(pk=int(ids[side])).first() for side in ("a", "b")]
    if None in found:
        raise NoSuchVersions(_("No such adapter version."), code="absent")
    return tuple(found)


def compare_url(a, b):
    return f"{reverse('admin:training_adapterversion_compare')}?a={a.pk}&b={b.pk}"


def compare_page(model_admin, request):
    """The admin page (staff with the view permission on versions), or its JSON with ?format=json."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    as_json = request.GET.get("format") == "json"
    try:
        a, b = chosen_versions(request.GET)
    except NoSuchVersions as exc:
        if as_json:
            return JsonResponse({"detail": str(exc)}, status=exc.status)
        raise Http404(str(exc)) from None
    comparison = version_comparison(a, b)
    if as_json:
        return JsonResponse(comparison, json_dumps_params={"ensure_ascii": False})
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": AdapterVersion._meta,
        "title": _("%(a)s and %(b)s compared") % {"a": a.name, "b": b.name},
        "comparison": comparison,
        "versions": {"a": a, "b": b},
        "json_url": f"{compare_url(a, b)}&format=json",
        "swap_url": compare_url(b, a),
        "GOT": GOT,
        "OTHER": OTHER,
    }
    return TemplateResponse(request, "admin/training/adapterversion/compare.html", context)


class VersionComparisonView(APIView):
    """GET /api/v1/adapter-versions/compare/?a=<id>&b=<id>: the compare page's JSON, for API clients."""

    permission_classes = [StaffModelPermissions]
    queryset = AdapterVersion.objects.all()  # what StaffModelPermissions reads the view_ permission from

    @extend_schema(
        tags=["adapter-versions"],
        summary="Compare two adapter versions",
        description="Both versions' evaluations side by side: each metric (and which version did better), each mode's "
        "figures, and per dev question the two answers with the reference's key facts each stated, missed, and the "
        "numbers it stated beyond them. Metrics and modes keep their codes (`name`, `mode`) and carry their names in "
        "the request's language (`label`, `mode_label`; Accept-Language) and each metric's explanation (`help`).",
        parameters=[
            OpenApiParameter("a", int, required=True, description="The first version's id."),
            OpenApiParameter("b", int, required=True, description="The second version's id."),
        ],
        responses={
            200: OpenApiResponse(description="{a, b, metrics, modes, questions}"),
            400: OpenApiResponse(description="`a` or `b` is missing or not an id."),
            404: OpenApiResponse(description="No version has that id."),
        },
    )
    def get(self, request):
        try:
            a, b = chosen_versions(request.query_params)
        except NoSuchVersions as exc:
            return Response({"detail": str(exc)}, status=exc.status)
        return Response(version_comparison(a, b))
