"""``python -m decode_worker --spec JSON``: one decode worker process (see `worker_runtime.main`)."""

import sys

from decode_worker.server import start_decode_worker
from worker_runtime.main import main

if __name__ == "__main__":
    sys.exit(main(start_decode_worker))
