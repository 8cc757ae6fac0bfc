"""Rank 1 fails in the way argv[-1] says; the others wait (and would hang the job without the launcher)."""
import os
import signal
import sys
import time

mode = sys.argv[-1]
rank = int(os.environ["RANK"])
try:
    print("ready", flush=True)
    if rank == 1 and mode == "raise":
        time.sleep(0.5)
        raise RuntimeError("boom on rank 1")
    if rank == 1 and mode == "kill":
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
