"""`nanokv eval`: needle-in-a-haystack, fidelity to the full cache, code completion."""
