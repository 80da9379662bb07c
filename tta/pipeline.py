"""The ``tta`` command's work: open the set, run every method under the protocol, write the report."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from selfsup.accel import default_device
from selfsup.checkpoint import source_line
from selfsup.config import save_config
from selfsup.errors import UsageError
from selfsup.files import ensure_writable_dir
from selfsup.precision import announce, describe_cpu, resolve_precision
from selfsup.report import markdown
from selfsup.tta import summary
from selfsup.tta.benchmark import check_corruptions, open_set, resolve_root
from selfsup.tta.corruptions import BENCHMARK
from selfsup.tta.runner import Benchmark, MethodResult


def run(config) -> tuple[str, dict[str, Path]]:
    """Returns the error and cost tables as Markdown and the report's paths."""
    corruption_set = open_set(resolve_root(config.dataset, config.data_root))
    wanted = config.corruptions or [n for n in BENCHMARK if n in corruption_set.available]
    names = check_corruptions(wanted, corruption_set)
    if not names:
        raise UsageError(
            f"{corruption_set.root} holds none of the benchmark's 15 corruptions (only "
            f"{', '.join(corruption_set.available)}): pass corruptions=... to use those"
        )
    corruption_set.check(names[0], config.severity)  # the severity and shapes, before any work
    out = ensure_writable_dir(config.out, "out=")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = default_device()
    asked = config.mixed_precision
    config.mixed_precision = resolve_precision(asked, device)
    bench = Benchmark(config, corruption_set, names, device)
    save_config(config, out / "config.yaml")
    results: list[MethodResult] = []
    for method in config.methods:
        result = bench.run(method)
        results.append(result)
        print(
            f"{method}: mean error {result.mean_error:.2f}% over {len(names)} corruption(s) "
            f"({result.seconds:.1f} s)",
            file=sys.stderr,
        )
    announce(asked, config.mixed_precision, device)  # after the work: a refusal stays one line
    kind = (
        "regenerated (selfsup.tta.generate; not the released set)"
        if corruption_set.regenerated
        else "released"
    )
    n = bench.n_images
    facts = [
        f"**Classifier** `{config.checkpoint}` ({bench.meta.spec.arch}, {bench.meta.num_classes} classes, "
        f"{bench.meta.img_size} px; its own normalization mean {tuple(bench.meta.mean)}, std {tuple(bench.meta.std)}).",
        f"**Set** `{corruption_set.root}`: {kind}, severity {config.severity}, {n} images per corruption, "
        f"{len(names)} corruption(s).",
        f"**Protocol** {config.protocol}; batch size {config.batch_size}; lr {config.entropy_lr:.3g} "
        f"(Tent/ETA/EATA/SAR); seed {config.seed}.",
        f"**Machine** {describe_cpu() if device.type == 'cpu' else torch.cuda.get_device_name(device)}; "
        f"precision {config.mixed_precision}.",
    ]
    if line := source_line(bench.meta.source):
        facts.insert(1, line)  # the classifier descends from a released file
    title = f"Test-time adaptation: {corruption_set.root.name}, severity {config.severity}, {config.protocol}"
    paths = summary.write(out, title, facts, results, names, bench.meta.source)
    tables = markdown("", [summary.error_table(results, names), summary.cost_table(results)])
    return tables.lstrip("# \n"), paths
