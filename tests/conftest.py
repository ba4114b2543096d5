import os
import sys

# Tests import the shared float64 reference as `reference`.
sys.path.insert(0, os.path.dirname(__file__))
# transformers is only a local reference in tests: never reach for the hub (no network in CI).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
