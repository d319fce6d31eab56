"""API throttles whose rates are read from settings at request time.

DRF's stock throttles copy their rates when the class is defined, so `override_settings`
and a changed env var would be ignored; reading `settings.CSP_API_THROTTLE_RATES` per request
keeps the rate where the rest of the configuration lives.
"""

from django.conf import settings
from rest_framework.throttling import AnonRateThrottle, UserRateThrottle


class AnonThrottle(AnonRateThrottle):
    def get_rate(self):
        return settings.CSP_API_THROTTLE_RATES[self.scope]


class UserThrottle(UserRateThrottle):
    def get_rate(self):
        return settings.CSP_API_THROTTLE_RATES[self.scope]
