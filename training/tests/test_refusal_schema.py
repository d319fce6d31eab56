"""A training run refused by the data checks answers with the body its OpenAPI schema declares
(schemathesis found the `checks` body outside the generic error schema)."""

import jsonschema
import pytest
from drf_spectacular.generators import SchemaGenerator


@pytest.mark.django_db
def test_a_run_refused_by_the_data_checks_answers_as_its_schema_says(staff_api, settings, tmp_path, tiny_model):
    settings.DATA_DIR, settings.CSP_BASE_MODEL = tmp_path, tiny_model
    response = staff_api.post("/api/v1/training-runs/", {"epochs": 1}, format="json")  # no approved pairs at all
    body = response.json()
    assert response.status_code == 400 and body["code"] == "checks" and body["checks"]["errors"][0]["code"] == "no_train"

    schema = SchemaGenerator().get_schema(request=None, public=True)
    declared = schema["paths"]["/api/v1/training-runs/"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    jsonschema.validate(body, {**declared, "components": schema["components"]})
