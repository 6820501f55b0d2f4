"""The served adaptive VLM: what the REST path costs over a direct `predict` call, and requests/s (issue 16).

Usage: python benchmarks/bench_adaptive_serving.py [--model-uri models:/adaptive-vlm@champion]
           [--requests 30] [--threads 1]
Needs a registered adaptive-vlm (the pipeline's adaptive_inference step registers one) and the
tracking store of MLFLOW_TRACKING_URI (default sqlite:///mlflow.db).

The same test-split requests (budget = 10 s, so every request runs the controller's own choice and
the two paths answer with the same configs) are answered first by the pyfunc loaded in this process,
then through `mlflow models serve` (one worker, loopback), one request at a time, after 3 warm-up
requests each. Prints per-request medians of both paths, the server path's overhead (median of the
paired differences, and the ratio of medians), and the served requests/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

import pandas as pd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/adaptive-vlm@champion")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import mlflow
    import torch

    from core.vqa.suite import DATASETS, load_split
    from tracking.pyfunc_models import encode_image
    from tracking.serving import ModelServer
    from tracking.store import configure_tracking

    configure_tracking()
    torch.set_num_threads(args.threads)
    per_dataset = -(-(args.requests + 3) // len(DATASETS))
    samples = [s for d in DATASETS for s in load_split(d, "test", per_dataset)][: args.requests + 3]
    frames = [pd.DataFrame({"image": [encode_image(s.image)], "question": [s.question], "budget_ms": [1e4]}) for s in samples]

    model = mlflow.pyfunc.load_model(args.model_uri)
    direct = []
    for i, frame in enumerate(frames):
        start = time.perf_counter()
        model.predict(frame)
        if i >= 3:
            direct.append((time.perf_counter() - start) * 1e3)

    with tempfile.TemporaryDirectory() as tmp, ModelServer(args.model_uri, Path(tmp) / "server.log",
                                                            env={"OMP_NUM_THREADS": str(args.threads)}) as server:
        served = []
        for i, frame in enumerate(frames):
            start = time.perf_counter()
            status, body = server.invoke(frame)
            if status != 200:
                raise SystemExit(f"server answered {status}: {body}")
            if i >= 3:
                served.append((time.perf_counter() - start) * 1e3)

    differences = [s - d for s, d in zip(served, direct)]
    print(f"{args.requests} requests at {args.threads} thread(s), model {args.model_uri}")
    print(f"direct predict: median {statistics.median(direct):.2f} ms/request")
    print(f"served (HTTP, loopback): median {statistics.median(served):.2f} ms/request, "
          f"{1e3 / statistics.mean(served):.1f} requests/s one at a time")
    print(f"server-path overhead: median of paired differences {statistics.median(differences):.2f} ms, "
          f"ratio of medians {statistics.median(served) / statistics.median(direct):.2f}")


if __name__ == "__main__":
    main()
