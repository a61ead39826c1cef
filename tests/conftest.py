import os

from hypothesis import settings

# Derandomized so a failure repeats; CI gets the same examples as a developer.
settings.register_profile("pcm", derandomize=True, deadline=None, max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "100")))
settings.load_profile("pcm")
