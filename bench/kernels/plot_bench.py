#!/usr/bin/env python3
"""Plots of the indexer benchmark's JSON (pd_indexer_bench --json): time vs
context length for the prefill selections and the decode selections, with the
anchors of issue #3. Usage: plot_bench.py indexer_bench.json OUT_DIR"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        data = json.load(f)
    out_dir = sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    device = data.get("meta", {}).get("device", "?")
    rows = data["rows"]

    pre = [r for r in rows if r.get("bench") == "prefill_select" and "causal" in r.get("shape", "")]
    pre.sort(key=lambda r: r["keys"])
    if pre:
        k = [r["keys"] / 1024 for r in pre]
        fig, ax = plt.subplots(figsize=(7.5, 5))
        series = [
            ("anchor_dense_ms", "anchor: DeepGEMM FP8 + radix top-k (H200)", "k--", "o"),
            ("dense_ms", "dense DSA (ours)", "C0-", "o"),
            ("dense_v1_ms", "dense DSA (ours, kernel v1)", "C0:", "x"),
            ("misa_ms", "MISA h=8 (router + select)", "C1-", "s"),
            ("misa_select_v1_ms", "MISA select (kernel v1)", "C1:", "x"),
            ("dagger_ms", "MISA-dagger (C=8192)", "C2-", "^"),
            ("hisa_ms", "HISA (128-token blocks, 64 kept)", "C3-", "v"),
        ]
        for key, label, style, marker in series:
            ys = [r.get(key) for r in pre]
            if all(y is not None for y in ys):
                ax.plot(k, ys, style, marker=marker, label=label)
        targets = [(64, 1.7), (128, 3.4)]
        ax.plot([t[0] for t in targets], [t[1] for t in targets], "r*", markersize=12,
                label="MISA target (6x the anchor)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(k)
        ax.set_xticklabels([f"{int(x)}K" for x in k])
        ax.set_xlabel("context length (keys), 8192 queries at its end, causal")
        ax.set_ylabel("ms per selection (top-2048)")
        ax.set_title(f"Prefill indexer selection, H=64 D=128 ({device})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "indexer_prefill_time_vs_context.png"), dpi=120)
        plt.close(fig)

    dec = [r for r in rows if r.get("bench") == "decode_select"]
    if dec:
        fig, ax = plt.subplots(figsize=(7.5, 5))
        batches = sorted({int(r["batch"]) for r in dec})
        for i, b in enumerate(batches):
            rs = sorted([r for r in dec if int(r["batch"]) == b], key=lambda r: r["keys"])
            k = [r["keys"] / 1024 for r in rs]
            ax.plot(k, [r["dense_us"] for r in rs], f"C{i}-", marker="o", label=f"dense, batch {b}")
            ax.plot(k, [r["misa_us"] for r in rs], f"C{i}--", marker="s", label=f"MISA, batch {b}")
            ax.plot(k, [r["filter_us"] for r in rs], f"C{i}:", marker="^",
                    label=f"MISA + 16-block filter, batch {b}")
            anchors = [(r["keys"] / 1024, r["anchor_us"]) for r in rs if r.get("anchor_us", -1) > 0]
            if anchors:
                ax.plot([a[0] for a in anchors], [a[1] for a in anchors], f"C{i}*", markersize=12,
                        label=f"anchor, batch {b}")
        ks = sorted({r["keys"] / 1024 for r in dec})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([f"{int(x)}K" for x in ks])
        ax.set_xlabel("context length (keys), one query per request")
        ax.set_ylabel("us per decode step (scoring + top-2048)")
        ax.set_title(f"Decode indexer selection, H=64 D=128 ({device})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "indexer_decode_time_vs_context.png"), dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
