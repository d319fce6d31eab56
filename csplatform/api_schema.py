"""The OpenAPI schema class of every API view (REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]).

drf-spectacular's AutoSchema plus the error responses each operation can answer with, so
clients (and schemathesis) know the shape of an error as well as of a success.
"""

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ResolvedComponent


class ApiSchema(AutoSchema):
    """drf-spectacular's AutoSchema plus the error responses, so clients (and schemathesis)
    know the shape of a 400 / 401 / 403 / 404 / 413 / 415 / 429 as well as of a success."""

    error_schema = {
        "description": (
            "`detail` for a request refused as a whole; field name -> messages for invalid fields; "
            "a bare list of messages for an invalid query (a search with a NUL character)."
        ),
        "oneOf": [
            {
                "type": "object",
                "additionalProperties": {
                    "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                },
            },
            {"type": "array", "items": {"type": "string"}},
        ],
    }
    error_descriptions = {
        "400": "The request is invalid.",
        "401": "No or invalid credentials.",
        "403": "The user lacks the permission.",
        "404": "Not found.",
        "413": "The request body is too large.",
        "415": "Unsupported media type.",
        "429": "Too many requests; see the Retry-After header.",
    }

    def get_filter_backends(self):
        # An export takes the list's filters, though it answers with a file, not a list.
        if getattr(self.view, "action", None) == "export":
            return getattr(self.view, "filter_backends", [])
        return super().get_filter_backends()

    def _error_codes(self):
        codes = {"401", "403", "429"}
        if self.method in ("POST", "PUT", "PATCH"):
            codes |= {"400", "413", "415"}
        if self.method == "GET" and getattr(self.view, "action", None) in ("list", "export"):
            codes.add("400")  # a bad filter value
        if "{" in self.path or (self.method == "GET" and getattr(self.view, "action", None) == "list"):
            codes.add("404")  # unknown id, or a page past the end
        return codes

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        component = ResolvedComponent(name="Error", type=ResolvedComponent.SCHEMA, object="Error", schema=self.error_schema)
        self.registry.register_on_missing(component)
        for code in sorted(self._error_codes()):
            declared = responses.get(code, {}).get("content", {}).get("application/json")
            if declared:
                # The view documents its own body for this code (import's report); a generic
                # error (a missing file, a bad multipart body) is possible too.
                declared["schema"] = {"oneOf": [declared["schema"], component.ref]}
            else:
                responses[code] = {
                    "description": self.error_descriptions[code],
                    "content": {"application/json": {"schema": component.ref}},
                }
        return responses
