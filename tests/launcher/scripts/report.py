import os
import sys

keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
print("env", " ".join(f"{k}={os.environ[k]}" for k in keys), "argv", " ".join(sys.argv[1:]))
