"""The SLO benchmark (`splitserve bench` runs the same): a load generator for any OpenAI-compatible server.

    .venv/bin/python benchmarks/slo.py --url http://127.0.0.1:8000 --rate 1,2,4,8 --slo ttft=1,tpot=0.1 \\
        --output results.json --plot out/run

See benchmarks/README.md for the workloads, the metric definitions and how to benchmark llama.cpp's server.
"""

import sys

from splitserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
