"""The full cache: nothing is evicted. The reference every other policy is measured against."""

from __future__ import annotations

from nanokv.policies.base import Policy


class FullCache(Policy):
    name = "full"
    evicts = False
