"""``python -m prefill_worker --spec JSON``: one prefill worker process (see `worker_runtime.main`)."""

import sys

from prefill_worker.server import start_prefill_worker
from worker_runtime.main import main

if __name__ == "__main__":
    sys.exit(main(start_prefill_worker))
