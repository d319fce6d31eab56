"""The compare page names metrics and answer modes as the evaluation page does, in the request's
language (training.evaluation_help); its JSON keeps the codes and adds the names. (And an id no
row can have, past the database's integer range, is a 404, not a server error.)"""

import pytest
from django.urls import reverse

from training.tests.factories import make_adapter_version

pytestmark = pytest.mark.django_db


def _evaluation(recall, mode):
    """A stored evaluation (its run's `metrics["eval"]`, cut down): one dev answer, given in `mode`."""
    return {
        "key_fact_recall": recall,
        "invented_number_share": 0.0,
        "dev_loss": 1.5,
        "modes": {mode: {"count": 1, "share": 1.0, "key_fact_recall": recall, "invented_number_share": 0.0}},
        "samples": [{"question": "几天发货", "reference": "1-3天发货。", "prediction": "1-3天发货。", "mode": mode}],
    }


@pytest.fixture
def versions(tmp_path):
    v1 = make_adapter_version("v1", path=tmp_path / "v1", metrics={"eval": _evaluation(1.0, "curated")})
    return v1, make_adapter_version("v2", path=tmp_path / "v2", beside=v1, metrics={"eval": _evaluation(0.5, "grounded")})


def _get(client, versions, language, **extra):
    a, b = versions
    query = "&".join(f"{key}={value}" for key, value in {"a": a.pk, "b": b.pk, **extra}.items())
    response = client.get(f"{reverse('admin:training_adapterversion_compare')}?{query}", HTTP_ACCEPT_LANGUAGE=language)
    assert response.status_code == 200
    return response


@pytest.mark.parametrize(
    ("language", "names"),
    [
        ("en", {"key_fact_recall": "key-fact recall", "dev_loss": "dev loss", "curated": "curated (verbatim)", "grounded": "grounded (generated)"}),
        ("zh-hans", {"key_fact_recall": "关键事实召回率", "dev_loss": "验证集损失", "curated": "标准答案（原样）", "grounded": "依据知识库生成"}),
    ],
)
def test_the_json_keeps_the_codes_and_adds_their_names_in_the_requests_language(versions, staff_client, language, names):
    body = _get(staff_client, versions, language, format="json").json()

    metrics = {row["name"]: row for row in body["metrics"]}
    assert metrics["key_fact_recall"]["label"] == names["key_fact_recall"]
    assert metrics["dev_loss"]["label"] == names["dev_loss"]
    assert metrics["dev_loss"]["help"] == ""  # llm explains no dev loss
    assert metrics["key_fact_recall"]["help"].startswith("Share of the numbers" if language == "en" else "参考答案中的数字")
    assert {row["mode"]: row["label"] for row in body["modes"]} == {"curated": names["curated"], "grounded": names["grounded"]}
    (question,) = body["questions"]
    assert (question["a"]["mode"], question["a"]["mode_label"]) == ("curated", names["curated"])
    assert (question["b"]["mode"], question["b"]["mode_label"]) == ("grounded", names["grounded"])


@pytest.mark.parametrize("language", ["en", "zh-hans"])
def test_the_page_shows_the_names_and_not_the_codes(versions, staff_client, language):
    html = _get(staff_client, versions, language).content.decode()

    for code in ("key_fact_recall", "invented_number_share", "dev_loss", ">curated<", ">grounded<"):
        assert code not in html
    if language == "en":
        assert "<td>key-fact recall<br>" in html and "<td>grounded (generated)</td>" in html
        assert '<span class="help">curated (verbatim)</span>' in html  # the answer's mode
    else:
        assert "<td>关键事实召回率<br>" in html and "<td>含编造的数字的回答<br>" in html


def test_an_id_past_the_databases_integer_range_is_no_such_version(versions, staff_api):
    v1, _v2 = versions
    response = staff_api.get(f"/api/v1/adapter-versions/compare/?a={v1.pk}&b={2**65}")
    assert response.status_code == 404
