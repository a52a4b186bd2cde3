import os
import sys

# Tests import the flat modules (gpt.py, vit.py, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
