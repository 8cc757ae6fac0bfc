import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread: tests spawn several ranks on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
