"""`peft-bench capacity`'s summary: per (workload, method) the largest value that trained within the cap, from the
rows of the search (`peft_bench.engine.capacity`)."""

from __future__ import annotations

from .format import sig, table


def largest(rows: list[dict]) -> dict | None:
    fits = [r for r in rows if r["fits"]]
    return max(fits, key=lambda r: r["value"]) if fits else None


def summary(rows: list[dict], cap: int, vary: str, device: str, argv: list[str] | None) -> str:
    held = sorted({str(r.get("mechanism") or "") for r in rows} - {""})
    how = "the probe process held under the cap by " + ("; ".join(held) if held else
                                                        "torch.cuda.set_per_process_memory_fraction" if
                                                        device == "cuda" else "the kernel")
    lines = ["# Capacity under a memory cap", "",
             f"`peft-bench {' '.join(argv or ['capacity'])}`: the largest {vary} that trains within "
             f"{cap / 2**30:.2f} GiB, by {how}; fresh-process probes, started from the planner's prediction where the "
             "step can be planned (three probes: half the planned value, which measures the runtime overhead; the "
             "largest value whose planned peak plus that overhead fits; one step above), else doubling then "
             "bisection. Every probe is in `capacity.csv`.", ""]
    body = []
    for (w, m) in dict.fromkeys((r["workload"], r["method"]) for r in rows):
        mine = [r for r in rows if (r["workload"], r["method"]) == (w, m)]
        best = largest(mine)
        over = [r for r in mine if r["fits"] is False and (best is None or r["value"] > best["value"])]
        stop = min(over, key=lambda r: r["value"]) if over else next((r for r in mine if r["fits"] is None), None)
        full = largest([r for r in rows if (r["workload"], r["method"]) == (w, "full")])
        body.append([w, m, str(best["value"]) if best else "none fits",
                     f"{float(best['peak_bytes']) / 2**20:,.0f}" if best and best["peak_bytes"] else "–",
                     (f"{stop['value']}: " + (f"{float(stop['peak_bytes']) / 2**20:,.0f} MiB" if stop["peak_bytes"]
                                              else stop["reason"])) if stop else "–",
                     f"{sig(best['value'] / full['value'])}×" if best and full else "–"])
    lines += table(["workload", "method", f"largest {vary} within the cap", "its whole-process RSS peak MiB (libraries too)",
                    "first value beyond (peak or reason)", "vs full"], body) + [""]
    return "\n".join(lines) + "\n"
