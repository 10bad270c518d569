"""Shared test configuration."""

from hypothesis import HealthCheck, settings

# The machine is shared and stalls now and then: per-example deadlines would make property
# tests flaky without telling us anything about correctness.
settings.register_profile(
    "convergedb", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("convergedb")
