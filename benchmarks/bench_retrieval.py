"""Benchmark: exact retrieval metrics (full-ranking mAP + hit@k + per-query table) vs the FAISS floor.

Usage::

    python benchmarks/bench_retrieval.py --queries 12550 --gallery 37183 --dim 256
    python benchmarks/bench_retrieval.py --queries 12550 --gallery 37183 --dim 256 --gallery-mult 4

Random seeded unit embeddings at DeepFashion2 validation scale; identity labels give every query at least
one relevant gallery item and 5.65 on average (1 + Poisson(4.65) gallery items per identity, as in the real
GT); the other gallery items are unlabelled distractors (style 0). ``--gallery-mult M`` multiplies the
number of distractors so the gallery is M times larger with the same relevant sets.

The measured part runs in a fresh child process (so ``peak_rss_mb`` is that whole process's peak, from
``resource.getrusage(RUSAGE_SELF).ru_maxrss``), with ``OPENBLAS_CORETYPE=Haswell`` (AVX2 machines) and
``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` set before numpy and faiss are imported; modules are
imported and warmed up before timing. Each repeat times, in turn:

* ``faiss_search_s``: ``faiss.IndexFlatIP.search(queries, 20)`` alone (the floor);
* ``total_eval_s``: ``capret_utils.evaluation.metrics.evaluate`` end to end (input checks, exact fused ranking,
  hit@1/5/10/15/20, full-ranking mAP and the per-query table with top-20 keys and scores).

Prints one JSON object: best and median of each, ``ratio`` = best total / best floor (and the median
ratio), ``peak_rss_mb``, the CPU time of both (all threads; ``cpu_ratio``, less sensitive to other load
on a shared machine than wall time) and run details.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _make_data(nq: int, ng: int, dim: int, mult: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    n_ids = max(1, round(nq * 3043 / 12550))  # the real GT: 3,043 identities for 12,550 queries
    per_id = 1 + rng.poisson(4.65, n_ids)
    n_rel = int(per_id.sum())
    ng_total = ng * mult
    if n_rel > ng_total:
        raise SystemExit(f"gallery of {ng_total} too small for {n_rel} relevant items")
    gl = np.full(ng_total, -1, dtype=np.int64)
    gl[rng.choice(ng_total, n_rel, replace=False)] = np.repeat(np.arange(n_ids), per_id)
    ql = rng.integers(0, n_ids, nq).astype(np.int64)
    Q = rng.standard_normal((nq, dim), dtype=np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    G = rng.standard_normal((ng_total, dim), dtype=np.float32)
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    return Q, G, ql, gl


def child(args: argparse.Namespace) -> dict:
    import resource
    import statistics

    import faiss
    import numpy as np

    from capret_utils.evaluation import metrics as M

    faiss.omp_set_num_threads(args.threads)
    Q, G, ql, gl = _make_data(args.queries, args.gallery, args.dim, args.gallery_mult, args.seed)
    cfg = M.EvalConfig(device="cpu", engine="numpy", num_threads=args.threads, progress=False)
    M.evaluate(Q[:64], G[:4096], ql[:64], gl[:4096], config=cfg)  # warm-up: imports, thread pools

    t = time.perf_counter()
    index = faiss.IndexFlatIP(args.dim)
    index.add(G)
    build_s = time.perf_counter() - t
    floor, total, floor_cpu, total_cpu = [], [], [], []
    res = D = I = None
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        D, I = index.search(Q, args.k)
        floor.append(time.perf_counter() - t)
        floor_cpu.append(time.process_time() - c)
        del res
        t, c = time.perf_counter(), time.process_time()
        res = M.evaluate(Q, G, ql, gl, ks=(1, 5, 10, 15, 20), list_length=args.k, config=cfg)
        total.append(time.perf_counter() - t)
        total_cpu.append(time.process_time() - c)
    agree = float((res.indices == I).mean())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "queries": args.queries, "gallery": int(G.shape[0]), "dim": args.dim, "k": args.k,
        "gallery_mult": args.gallery_mult, "threads": args.threads, "repeats": args.repeats,
        "faiss_search_s": round(min(floor), 4), "faiss_search_s_median": round(statistics.median(floor), 4),
        "total_eval_s": round(min(total), 4), "total_eval_s_median": round(statistics.median(total), 4),
        "ratio": round(min(total) / min(floor), 3),
        "ratio_median": round(statistics.median(total) / statistics.median(floor), 3),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "faiss_search_cpu_s": round(min(floor_cpu), 3), "total_eval_cpu_s": round(min(total_cpu), 3),
        "cpu_ratio": round(min(total_cpu) / min(floor_cpu), 3),
        "faiss_index_build_s": round(build_s, 4),
        "top_k_agreement_with_faiss": agree,
        "mean_relevant": res.metrics["mean_relevant"],
        "mAP": res.metrics["mAP"], "top1": res.metrics["top1"], "top20": res.metrics["top20"],
        "per_query_rows": int(len(res.per_query)),
        "floor_runs_s": [round(x, 3) for x in floor], "total_runs_s": [round(x, 3) for x in total],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=12550)
    p.add_argument("--gallery", type=int, default=37183)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=20, help="list length (the floor searches top-k)")
    p.add_argument("--gallery-mult", type=int, default=1, help="gallery size multiplier (distractors)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all this process may use)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads <= 0:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.child:
        print(json.dumps(child(args)))
        return
    env = dict(os.environ)
    env["OPENBLAS_NUM_THREADS"] = str(args.threads)
    env["OMP_NUM_THREADS"] = str(args.threads)
    try:
        if "avx2" in open("/proc/cpuinfo").read():
            env.setdefault("OPENBLAS_CORETYPE", "Haswell")  # faiss-cpu's OpenBLAS: ~2x on AVX2
    except OSError:
        pass
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *sys.argv[1:]]
    if "--threads" not in sys.argv:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(out.returncode)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["env"] = {k: env.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
