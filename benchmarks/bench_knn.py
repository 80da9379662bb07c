"""kNN speed: selfsup's kNN (auto backend) vs its torch fallback vs scikit-learn, plus peak memory.

    .venv/bin/python benchmarks/bench_knn.py                      # the issue's sizes
    .venv/bin/python benchmarks/bench_knn.py --n-train 10000 --n-test 2000 --memory-train 200000

Synthetic features: 100 class centres on the unit sphere plus Gaussian noise. scikit-learn runs
``KNeighborsClassifier(algorithm="brute", metric="cosine", weights="distance")``: the same
neighbours, but votes weighted by 1 / cosine distance instead of DINO's exp(similarity / T), so
its accuracy differs slightly; the search, which dominates the time, is the same work.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def features(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    x = centres[labels] + 5.0 * rng.normal(size=(n, dim)).astype(np.float32)
    return x.astype(np.float32), labels


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def speed(args) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    from selfsup.eval.knn import knn_classify, resolve_backend

    xb, yb = features(args.n_train, args.dim, args.classes, 1)
    xq, yq = features(args.n_test, args.dim, args.classes, 2)
    tb, tyb, tq, tyq = map(torch.from_numpy, (xb, yb, xq, yq))
    k = args.k
    rows = {}
    for backend in ("auto", "torch", "faiss-cpu"):
        try:
            name = resolve_backend(backend, k)
        except Exception as err:  # faiss not installed
            print(f"skip {backend}: {err}")
            continue
        seconds, res = timed(lambda b=backend: knn_classify(tb, tyb, tq, tyq, ks=(k,), backend=b), args.repeat)
        rows[f"selfsup {backend} ({name})"] = (seconds, res[k].top1)
    seconds, res = timed(lambda: knn_classify(tb, tyb, tq, tyq, ks=(10, 20, 100, 200)), args.repeat)
    rows["selfsup auto, k in 10/20/100/200 (one search)"] = (seconds, res[20].top1)

    def sk():
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine", weights="distance")
        return 100.0 * (clf.fit(xb, yb).predict(xq) == yq).mean()

    rows["scikit-learn brute cosine"] = timed(sk, 1)
    base = rows["scikit-learn brute cosine"][0]
    torch_s = rows[next(r for r in rows if r.startswith("selfsup torch"))][0]
    print(f"\nkNN k={k}: train {args.n_train} x {args.dim}, test {args.n_test}, {args.classes} classes, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'method':50s} {'seconds':>8s} {'top-1':>7s} {'vs sklearn':>11s} {'vs torch':>9s}")
    for name, (s, acc) in rows.items():
        print(f"{name:50s} {s:8.2f} {acc:7.2f} {base / s:10.1f}x {torch_s / s:8.2f}x")
    return {name: {"seconds": s, "top1": acc} for name, (s, acc) in rows.items()}


def memory_child(n_train: int, n_test: int, dim: int, backend: str) -> None:
    from selfsup.eval.knn import knn_classify

    train = torch.randn(n_train, dim)
    labels = torch.randint(0, 100, (n_train,))
    test = torch.randn(n_test, dim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    knn_classify(train, labels, test, ks=(10, 20, 100, 200), backend=backend)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_before_mib": before / 1024, "peak_rss_mib": after / 1024, "seconds": time.perf_counter() - start}))


def memory(args) -> None:
    inputs = (args.memory_train + args.memory_test) * args.dim * 4 / 2**20
    # torch backend: one similarity chunk of at most 2**26 floats (256 MiB) plus its top-k, and a
    # normalised copy of the features (the inputs again).
    print(f"\npeak memory, {args.memory_train} train x {args.dim}, {args.memory_test} test, k up to 200 "
          f"(inputs {inputs:.0f} MiB; torch chunk bound 256 MiB + normalised copy {inputs:.0f} MiB):")
    for backend in ("torch", "auto"):
        code = (f"import sys; sys.path.insert(0, {sys.path[0]!r}); import bench_knn; "
                f"bench_knn.memory_child({args.memory_train}, {args.memory_test}, {args.dim}, {backend!r})")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        print(f"  {backend:6s}: peak RSS {m['peak_rss_mib']:.0f} MiB (before search {m['rss_before_mib']:.0f} MiB, "
              f"search adds {m['peak_rss_mib'] - m['rss_before_mib']:.0f} MiB), {m['seconds']:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--memory-train", type=int, default=1_000_000, help="0 skips the memory check")
    p.add_argument("--memory-test", type=int, default=1_000)
    args = p.parse_args()
    speed(args)
    if args.memory_train:
        memory(args)


if __name__ == "__main__":
    main()
