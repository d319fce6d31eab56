"""The canary rollout clicked through in headless Chromium against a live daphne (issue #15: a page
is involved): the version list's action asks for the share and starts the canary, the analytics
page shows its two sides, and one click there promotes it (or stops it) and comes back.

Needs Debian's chromium and chromedriver; skipped without them (tests/test_one_language.py's
browser)."""

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from tests.support.livetest import live_daphne
from tests.test_one_language import browser  # noqa: F401 (a fixture)
from training import canary
from training.models import AdapterVersion
from training.tests.factories import make_adapter_version

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.live, pytest.mark.browser]


@pytest.fixture
def staff_browser(training_env, tiny_model, superuser, browser):  # noqa: F811 (the fixture imported above)
    """v1 active and v2 beside it (rows only: no answer is generated), a live daphne, and Chromium
    logged in as a superuser, in English. Yields (the browser, the server's url, v1, v2)."""
    v1 = make_adapter_version("v1", path=training_env / "v1", is_active=True, activated_at=timezone.now())
    v2 = make_adapter_version("v2", path=training_env / "v2", beside=v1)
    login = Client()
    login.force_login(superuser)
    env = {"CSP_DATA_DIR": str(training_env), "CSP_BASE_MODEL": str(tiny_model)}
    with live_daphne(env=env, log=training_env / "daphne.log") as url:
        browser.get(url + "/static/css/site.css")  # the site's origin, for its cookies
        browser.add_cookie({"name": settings.SESSION_COOKIE_NAME, "value": login.cookies[settings.SESSION_COOKIE_NAME].value, "path": "/"})
        browser.add_cookie({"name": settings.LANGUAGE_COOKIE_NAME, "value": "en", "path": "/"})
        yield browser, url, v1, v2


def _start_canary(driver, url, version, percent):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(url + "/admin/training/adapterversion/")
    driver.find_element(By.CSS_SELECTOR, f"input.action-select[value='{version.pk}']").click()
    Select(driver.find_element(By.CSS_SELECTOR, "select[name=action]")).select_by_value("canary")
    driver.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    # each click's page may come after find_element looks: wait for what the next step needs
    share = WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.NAME, "percent"))[0]
    share.clear()
    share.send_keys(str(percent))
    driver.find_element(By.NAME, "start_canary").click()
    # The click does not wait for the POST's answer: a driver.get() right after it could cancel the
    # navigation (seen on a loaded machine). Wait for the version list's message that it started.
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".messagelist"))


def _wait_for_text(driver, text):
    """Until the page (after a click's navigation) shows `text` in its content, 30 s at most."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d):
        content = d.find_elements(By.ID, "content")
        return bool(content) and text in content[0].text

    WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(shown)


def test_staff_start_a_canary_from_the_version_list_and_promote_it_from_analytics_in_one_click(staff_browser):
    from selenium.webdriver.common.by import By

    driver, url, v1, v2 = staff_browser
    _start_canary(driver, url, v2, 25)
    assert driver.current_url == url + "/admin/training/adapterversion/"
    # (lower-cased: the admin's stylesheet capitalises a message's first letter)
    assert "v2 now answers 25% of the new conversations" in driver.find_element(By.CSS_SELECTOR, ".messagelist").text.lower()
    assert "Canary: v2 answers 25% of the new conversations" in driver.find_element(By.ID, "canary-panel").text
    v2.refresh_from_db()
    assert (v2.is_canary, v2.canary_percent) == (True, 25)

    driver.get(url + "/admin/analytics/")
    assert "Canary: v2 on 25% of new conversations" in driver.find_element(By.ID, "content").text
    assert driver.find_elements(By.ID, "analytics-canary")
    driver.find_element(By.CSS_SELECTOR, "input[type=submit][value='Promote v2 (activate it)']").click()
    _wait_for_text(driver, "Last canary: v2 (ended)")
    assert driver.current_url == url + "/admin/analytics/"  # back where it was clicked
    assert "Last canary: v2 (ended)" in driver.find_element(By.ID, "content").text
    assert not driver.find_elements(By.CSS_SELECTOR, "input[type=submit][value='Promote v2 (activate it)']")
    assert AdapterVersion.objects.get(is_active=True) == v2 and canary.current_canary() is None


def test_staff_stop_a_canary_from_analytics_in_one_click_and_the_active_version_stays(staff_browser):
    from selenium.webdriver.common.by import By

    driver, url, v1, v2 = staff_browser
    _start_canary(driver, url, v2, 10)
    driver.get(url + "/admin/analytics/")
    driver.find_element(By.CSS_SELECTOR, "input[type=submit][value='Stop the canary']").click()
    _wait_for_text(driver, "Last canary: v2 (ended)")
    assert driver.current_url == url + "/admin/analytics/"
    assert "Last canary: v2 (ended)" in driver.find_element(By.ID, "content").text
    assert AdapterVersion.objects.get(is_active=True) == v1 and canary.current_canary() is None
