import os

from hypothesis import settings

# CI (CI=true) replays the same examples every run, so a landing never hinges on a lucky draw; local runs
# keep exploring new ones (and hypothesis' database replays any failure found).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
