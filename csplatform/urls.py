from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from chat.analytics_views import AnalyticsView, analytics_page
from csplatform.login_throttle import ThrottledAdminAuthenticationForm

admin.site.site_header = "csplatform"
admin.site.login_form = ThrottledAdminAuthenticationForm  # brute force is rate-limited
admin.site.site_title = "csplatform"
admin.site.index_title = admin.site.site_header

urlpatterns = [
    path("i18n/", include("django.conf.urls.i18n")),
    path("api/v1/", include("knowledge.urls")),
    path("api/v1/", include("training.urls")),
    path("api/v1/", include("chat.urls")),
    path("api/v1/analytics/", AnalyticsView.as_view(), name="api-analytics"),
    path("v1/", include("chat.openai_views")),  # the OpenAI-compatible API (base_url=".../v1")
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-redoc"),
    path("admin/analytics/", admin.site.admin_view(analytics_page), name="admin-analytics"),
    path("admin/", admin.site.urls),
    path("", include("chat.urls_pages")),  # the customer chat page: / (home) and /chat/
]

handler404 = "csplatform.views.not_found"
