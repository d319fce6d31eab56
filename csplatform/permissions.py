"""API permission shared by the staff endpoints of every app."""

from rest_framework import permissions


class StaffModelPermissions(permissions.DjangoModelPermissions):
    """Staff with the model's Django permissions; reading needs the view_ permission too.

    Drafts, runs and adapters are internal, so an authenticated customer gets nothing here.
    """

    perms_map = {
        **permissions.DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "OPTIONS": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }

    def has_permission(self, request, view):
        user = request.user
        if not (user and user.is_authenticated and (user.is_staff or user.is_superuser)):
            return False
        return super().has_permission(request, view)
