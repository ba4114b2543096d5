import os
import sys

# Tests import the shared float64 reference as `reference`.
sys.path.insert(0, os.path.dirname(__file__))
