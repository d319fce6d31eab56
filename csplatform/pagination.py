"""Pagination with a client-chosen page size that can never exceed CSP_API_MAX_PAGE_SIZE."""

from django.conf import settings
from rest_framework.pagination import PageNumberPagination


class CappedPageNumberPagination(PageNumberPagination):
    page_size_query_param = "page_size"

    @property
    def max_page_size(self):
        return settings.CSP_API_MAX_PAGE_SIZE
