"""Shared test settings.

Hypothesis deadlines are off: this machine trains models in the background and timing is not what we test.
"""

from hypothesis import settings

settings.register_profile("default", deadline=None, max_examples=100)
settings.load_profile("default")
