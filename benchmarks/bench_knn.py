"""kNN speed: exact search against the CPU's matmul peak, selfsup vs scikit-learn, approximate indexes at scale.

    .venv/bin/python benchmarks/bench_knn.py                      # the issue's sizes (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_knn.py --n-train 10000 --n-test 2000 --memory-train 200000 \\
        --scale-train 200000 --scale-test 2000                    # a few minutes

One run reports:

1. the machine (CPU model, cores, vector instruction set, native bf16: `selfsup.precision.describe_cpu`) and its measured fp32
   matmul peak: the best of 5 torch products of two 4096 x 4096 matrices (2 x 4096^3 FLOP each),
   measured again at the end;
2. at ``--n-train`` (50,000 x 384, 100 classes, 10,000 queries, k=20): selfsup's kNN (auto
   backend) vs its torch fallback vs scikit-learn, and the exact search's GFLOP/s (2 N Q d FLOP,
   the similarity product that dominates it) as a share of that peak;
3. at ``--scale-train`` (1,000,000 x 384, 1,000 classes, 10,000 queries, k=20): exact search
   (``IndexFlatIP``) against the approximate ``ivf`` and ``ivfpq`` indexes with their default
   parameters, each searched at several nprobe: build and search seconds, speed ratio to exact,
   recall@k against exact and the kNN top-1 difference;
4. peak memory of exact kNN at ``--memory-train`` rows (torch and auto backends, subprocesses;
   run before section 3).

Synthetic features. Section 2: 100 Gaussian class centres, N(0, 1) per dimension, plus
N(0, 5^2) noise: near-isotropic, the worst case for any index (``--scale-data isotropic`` runs
section 3 on them too). Section 3, ``clustered`` (default): a 1,000-class Gaussian mixture in
32 dimensions (centres N(0, 0.8^2), unit within-class spread) mapped linearly to ``--dim`` plus
N(0, 0.3^2) noise, i.e. features of low intrinsic dimension, as learned representations are.
scikit-learn runs ``KNeighborsClassifier(algorithm="brute", metric="cosine", weights="distance")``:
the same neighbours, but votes weighted by 1 / cosine distance instead of DINO's exp(similarity / T),
so its accuracy differs slightly; the search, which dominates the time, is the same work.
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

from selfsup.precision import describe_cpu


def features(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    x = centres[labels] + 5.0 * rng.normal(size=(n, dim)).astype(np.float32)
    return x.astype(np.float32), labels


def clustered_features(
    n: int, dim: int, classes: int, seed: int, latent: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Low-intrinsic-dimension labelled features (module docstring), built in float32 chunks."""
    shared = np.random.default_rng(0)  # centres and map shared by train and test
    lift = (shared.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)).astype(np.float32)
    centres = 0.8 * shared.standard_normal((classes, latent), dtype=np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1 << 17):
        y = labels[start : start + (1 << 17)]
        z = centres[y] + rng.standard_normal((len(y), latent), dtype=np.float32)
        x[start : start + len(y)] = z @ lift + 0.3 * rng.standard_normal((len(y), dim), dtype=np.float32)
    return x, labels


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def machine() -> dict:
    info = {"cpu": describe_cpu()}  # model, cores, vector ISA, native bf16 or not
    info["torch_threads"] = torch.get_num_threads()
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return info


def matmul_peak(n: int = 4096, repeat: int = 5) -> float:
    """Measured fp32 GFLOP/s of one large torch matrix product (what an exact search is made of)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, page faults
    seconds, _ = timed(lambda: a @ b, repeat)
    gflops = 2 * n**3 / seconds / 1e9
    print(f"fp32 matmul peak: {gflops:.1f} GFLOP/s ({n} x {n} x {n}, best of {repeat}: {seconds:.2f} s)")
    return gflops


def exact_share(label: str, seconds: float, n_train: int, n_test: int, dim: int, peak: float) -> dict:
    gflops = 2 * n_train * n_test * dim / seconds / 1e9
    print(f"{label}: {seconds:.2f} s, {gflops:.1f} GFLOP/s = {100 * gflops / peak:.0f}% of the matmul peak")
    return {"seconds": seconds, "gflops": gflops, "share_of_peak": gflops / peak}


def speed(args, peak: float) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    from selfsup.eval.knn import knn_classify, neighbours, resolve_backend

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
        seconds, res = timed(
            lambda b=backend: knn_classify(tb, tyb, tq, tyq, ks=(k,), backend=b), args.repeat
        )
        rows[f"selfsup {backend} ({name})"] = (seconds, res[k].top1)
    seconds, res = timed(lambda: knn_classify(tb, tyb, tq, tyq, ks=(10, 20, 100, 200)), args.repeat)
    rows["selfsup auto, k in 10/20/100/200 (one search)"] = (seconds, res[20].top1)

    def sk():
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine", weights="distance")
        return 100.0 * (clf.fit(xb, yb).predict(xq) == yq).mean()

    rows["scikit-learn brute cosine"] = timed(sk, 1)
    base = rows["scikit-learn brute cosine"][0]
    torch_s = rows[next(r for r in rows if r.startswith("selfsup torch"))][0]
    print(
        f"\nkNN k={k}: train {args.n_train} x {args.dim}, test {args.n_test}, {args.classes} classes, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'method':50s} {'seconds':>8s} {'top-1':>7s} {'vs sklearn':>11s} {'vs torch':>9s}")
    for name, (s, acc) in rows.items():
        print(f"{name:50s} {s:8.2f} {acc:7.2f} {base / s:10.1f}x {torch_s / s:8.2f}x")
    out = {name: {"seconds": s, "top1": acc} for name, (s, acc) in rows.items()}
    for backend in ("torch", "auto"):
        seconds, found = timed(lambda b=backend: neighbours(tb, tq, k, b, "flat"), args.repeat)
        out[f"exact search {backend}"] = exact_share(
            f"exact search alone, {backend} ({found.backend})",
            seconds,
            args.n_train,
            args.n_test,
            args.dim,
            peak,
        )
    return out


def scale(args, peak: float) -> dict:
    """Exact vs ivf vs ivfpq at ``--scale-train`` rows: speed, recall@k, kNN top-1."""
    from selfsup.eval.knn import Neighbours, build_index, classify_neighbours, neighbours, recall_at_k

    n, q, dim, k = args.scale_train, args.scale_test, args.dim, args.k
    gen = clustered_features if args.scale_data == "clustered" else features
    start = time.perf_counter()
    xb, yb = gen(n, dim, args.scale_classes, 1)
    xq, yq = gen(q, dim, args.scale_classes, 2)
    tb, tyb, tq, tyq = map(torch.from_numpy, (xb, yb, xq, yq))
    print(
        f"\napproximate kNN at scale: {args.scale_data} features, train {n} x {dim}, test {q}, "
        f"{args.scale_classes} classes, k={k} (data made in {time.perf_counter() - start:.0f} s)"
    )
    exact_s, exact = timed(lambda: neighbours(tb, tq, k, "faiss-cpu", "flat"))
    exact_top1 = classify_neighbours(exact, tyb, tyq, ks=(k,))[k].top1
    out = {"exact": exact_share("exact search (faiss-cpu IndexFlatIP)", exact_s, n, q, dim, peak)}
    out["exact"]["top1"] = exact_top1
    print(f"exact kNN top-1 {exact_top1:.2f}")
    header = (
        f"{'index':62s} {'build s':>8s} {'search s':>9s} {'vs exact (search)':>18s} "
        f"{'vs exact (build+search)':>24s} {'recall@' + str(k):>10s} {'top-1':>7s} {'diff':>6s}"
    )
    print(header)
    for kind in ("ivf", "ivfpq"):
        build_s, built = timed(lambda kind=kind: build_index(tb, kind))
        for divisor in args.nprobe_divisors:
            nprobe = max(1, round(built.nlist / divisor))
            search_s, (sims, idx) = timed(lambda b=built, nprobe=nprobe: b.search(tq, k, nprobe))
            found = Neighbours(sims, idx, "faiss-cpu", built.describe(nprobe))
            top1 = classify_neighbours(found, tyb, tyq, ks=(k,))[k].top1
            recall = recall_at_k(idx, exact.idx)
            label = found.index + (" (default)" if nprobe == built.nprobe else "")
            print(
                f"{label:62s} {build_s:8.1f} {search_s:9.2f} {exact_s / search_s:17.1f}x "
                f"{exact_s / (build_s + search_s):23.2f}x {recall:10.3f} {top1:7.2f} {top1 - exact_top1:+6.2f}"
            )
            out[found.index] = {
                "build_seconds": build_s, "search_seconds": search_s, "recall": recall, "top1": top1,
                "speedup_search": exact_s / search_s, "speedup_total": exact_s / (build_s + search_s),
            }  # fmt: skip
        built = None  # free the index before the next one is built
    return out


def memory_child(n_train: int, n_test: int, dim: int, backend: str) -> None:
    from selfsup.eval.knn import knn_classify

    train = torch.randn(n_train, dim)
    labels = torch.randint(0, 100, (n_train,))
    test = torch.randn(n_test, dim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    knn_classify(train, labels, test, ks=(10, 20, 100, 200), backend=backend)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "rss_before_mib": before / 1024,
                "peak_rss_mib": after / 1024,
                "seconds": time.perf_counter() - start,
            }
        )
    )


def memory(args) -> None:
    inputs = (args.memory_train + args.memory_test) * args.dim * 4 / 2**20
    # torch backend: one similarity chunk of at most 2**26 floats (256 MiB) plus its top-k, and a
    # normalised copy of the features (the inputs again).
    print(
        f"\npeak memory, {args.memory_train} train x {args.dim}, {args.memory_test} test, k up to 200 "
        f"(inputs {inputs:.0f} MiB; torch chunk bound 256 MiB + normalised copy {inputs:.0f} MiB):"
    )
    for backend in ("torch", "auto"):
        code = (
            f"import sys; sys.path.insert(0, {sys.path[0]!r}); import bench_knn; "
            f"bench_knn.memory_child({args.memory_train}, {args.memory_test}, {args.dim}, {backend!r})"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        print(
            f"  {backend:6s}: peak RSS {m['peak_rss_mib']:.0f} MiB (before search {m['rss_before_mib']:.0f} MiB, "
            f"search adds {m['peak_rss_mib'] - m['rss_before_mib']:.0f} MiB), {m['seconds']:.1f} s"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=50_000, help="0 skips section 2")
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--scale-train", type=int, default=1_000_000, help="0 skips the approximate-index section")
    p.add_argument("--scale-test", type=int, default=10_000)
    p.add_argument("--scale-classes", type=int, default=1_000)
    p.add_argument("--scale-data", choices=["clustered", "isotropic"], default="clustered")
    p.add_argument(
        "--nprobe-divisors", type=lambda s: [float(v) for v in s.split(",")], default=[128, 64, 32, 16],
        help="search each index at nprobe = nlist / d for each d (the default nprobe is marked)",
    )  # fmt: skip
    p.add_argument("--memory-train", type=int, default=1_000_000, help="0 skips the memory check")
    p.add_argument("--memory-test", type=int, default=1_000)
    p.add_argument("--smoke", action="store_true", help="each section once at a tiny size (CI)")
    args = p.parse_args()
    args.peak_size = 4096
    if args.smoke:
        args.peak_size = 512
        args.n_train, args.n_test, args.dim, args.classes = 2_000, 200, 32, 10
        args.scale_train, args.scale_test, args.scale_classes = 20_000, 200, 10
        args.memory_train, args.memory_test = 2_000, 100
    machine()
    # Shares use the peak measured first; it is measured again at the end because other jobs on a
    # shared machine change it (both are printed: a share is only as good as the peak next to it).
    peak = matmul_peak(n=args.peak_size)
    if args.n_train:
        speed(args, peak)
    # Before the scale section: a child's ru_maxrss starts at its parent's (Linux copies the
    # high-water mark through fork and exec), so the 1 M-row data would mask the children's peaks.
    if args.memory_train:
        memory(args)
    if args.scale_train:
        scale(args, peak)
    matmul_peak(n=args.peak_size)


if __name__ == "__main__":
    main()
