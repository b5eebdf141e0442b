"""`peft-bench compare BASE NEW`: what changed between two result directories, judged against the noise.

Cells are joined by identity: every field of a cell's key that is not declared a budget in `peft_bench.config`
(method, workload or model, device, dtype, seed, rate, method options, replica, parallel mode and world size, a
sweep's parameter and value, width, depth, gradient checkpointing, ...), so no two cells of a run collapse into one.
For each joined cell and metric, one verdict:

* exact quantities (trainable and total parameters, static memory, checkpoint bytes) must be equal: any change
  is `worse` (a changed structure is a regression until the baseline is updated on purpose);
* step time is judged by the ratio NEW / BASE with a 95 % Welch t-interval on the logs of both runs' process medians
  (repeats.csv; from the rows' intervals when a run has no repeats file): `worse` only when the interval lies above 1
  and the ratio exceeds the noise floor (the larger A/A floor of the two runs, or 10 % when neither measured one),
  `better` symmetrically, else `same`; a one-repeat side has no interval and is judged by the floor alone; a cell
  measured under interference is `not comparable` for time, never `worse`;
* the tensor peak (a deterministic count) within 1 %; the process peak within 10 % (the RSS high-water mark moves
  with allocator timing); accuracy within two standard errors of a difference of proportions;
* `not comparable` — other budget (steps, batch, sequence length), a cell only in NEW, not `ok` on one side.

Exit status: 0 when nothing got worse; 1 when something did or a BASE cell is missing from NEW (`--allow-missing`
accepts that), each named on stderr; 2 on bad input — a NEW with no rows or no cell in common, two rows with one
identity, a measured column missing or not a number, other library versions or machine (`--across-versions`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import results
from ..config import SAME_CELL, cell_defaults
from ..errors import UserError
from ..measure.repeats import floor_of, of_run, used
from ..measure.repeats import number as _f
from ..measure.stats import Estimate, welch_difference
from .format import sig, table

EXACT = ("trainable_params", "total_params", "static_closed_form_bytes", "checkpoint_bytes")
MEASURED = ("step_time_s", "tensor_peak_bytes", "process_peak_bytes", "accuracy")
IDENTITY = SAME_CELL  # the CellSpec fields that make two rows the same cell (declared in peft_bench/config.py)
VERSIONS = ("torch", "transformers", "peft", "python")
MACHINE = ("cpu", "cpu_count", "gpu", "torch_threads")
DEFAULT_FLOOR = 0.10  # between-process timing noise on a small shared machine, when no A/A was measured
TOLERANCE = {"tensor_peak_bytes": 0.01, "process_peak_bytes": 0.10}


@dataclass
class Line:
    cell: str
    metric: str
    base: str
    new: str
    change: str
    verdict: str
    why: str = ""


@dataclass
class Side:
    """One result directory: its rows by identity, its environment, its header and its repeats by cell key."""

    path: Path
    rows: dict[str, dict]
    env: dict
    header: set[str]
    samples: dict[str, dict[int, dict]]


def _load(path: Path) -> Side:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; pass two result directories (each with metrics.csv)")
    if not (path / "metrics.csv").is_file():
        raise UserError(f"{path} has no metrics.csv; pass the --out directory of a run")
    rows = results.read_rows(path / "metrics.csv")
    env = results.read_environment(path)
    by_id: dict[str, dict] = {}
    for r in rows:
        ident = _identity(r)[0]
        if ident in by_id:
            raise UserError(f"{path}/metrics.csv has two rows for one cell ({_label(r)}, {ident}); a run holds each "
                            "cell once")
        by_id[ident] = r
    _check_numbers(path, rows)
    samples = results.read_samples(path / "repeats.csv")
    return Side(path, by_id, env, results.read_header(path / "metrics.csv"),
                used(of_run(samples, env.get("run_id"))))


def _check_numbers(path: Path, rows: list[dict]) -> None:
    for r in rows:
        for col in (*EXACT, *MEASURED):
            v = r.get(col, "")
            if r.get("status") == "ok" and v not in ("", None) and _f(v) != _f(v) and str(v).lower() != "nan":
                raise UserError(f"{path}/metrics.csv: {col} of {_label(r)} is {v!r}, not a number")


def _identity(row: dict) -> tuple[str, dict]:
    """(the cell's identity, its budget fields): a key written before a field existed holds its default."""
    spec = {**cell_defaults(), **json.loads(row["cell_key"])}
    ident = {k: spec.get(k) for k in IDENTITY}
    rest = {k: v for k, v in spec.items() if k not in IDENTITY}
    return json.dumps(ident, sort_keys=True), rest


def _label(row: dict) -> str:
    spec = {**cell_defaults(), **json.loads(row["cell_key"])}
    parts = [f"{spec['parallel']} × {spec['nproc'] * spec['nnodes']}" if spec.get("parallel") else "",
             f"{spec['vary']}={spec['vary_value']:g}" if spec.get("vary") and spec.get("vary_value") is not None
             else "", f"seed {spec['seed']}" if spec.get("seed") else "", "A/A copy" if spec.get("replica") else ""]
    extra = ", ".join(p for p in parts if p)
    return f"{row['method']} × {row['workload']}" + (f" ({extra})" if extra else "")


def _diff(a: dict, b: dict, keys) -> str:
    return ", ".join(f"{k} {a.get(k)} → {b.get(k)}" for k in keys if a.get(k) != b.get(k))


def _logs(got: dict[int, dict] | None) -> list[float]:
    return [math.log(_f(s["step_time_s"])) for s in (got or {}).values() if _f(s["step_time_s"]) > 0]


def _step_ratio(b: dict, n: dict, bs: dict | None, ns: dict | None) -> Estimate:
    """NEW / BASE: from both runs' process medians, the Welch t-interval of the difference of their log means;
    without repeats files, the rows' intervals combined in log space; no interval when a side has one repeat."""
    bv, nv = _f(b["step_time_s"]), _f(n["step_time_s"])
    r = nv / bv
    lb, ln = _logs(bs), _logs(ns)
    if len(lb) >= 2 and len(ln) >= 2:
        d = welch_difference(ln, lb)
        half = (d.high - d.low) / 2
        return Estimate(r, r * math.exp(-half), r * math.exp(half), d.n)
    ends = [_f(x.get(k)) for x in (b, n) for k in ("step_time_ci_low_s", "step_time_ci_high_s")]
    if any(e != e or e <= 0 for e in ends) or len(lb) == 1 or len(ln) == 1:
        return Estimate(r, math.nan, math.nan, 1)
    blo, bhi, nlo, nhi = ends
    down = math.hypot(math.log(nv / nlo), math.log(bhi / bv))
    up = math.hypot(math.log(nhi / nv), math.log(bv / blo))
    return Estimate(r, r * math.exp(-down), r * math.exp(up), 2)


def _fmt(metric: str, x: float) -> str:
    if x != x:
        return ""
    if metric.endswith("_bytes"):
        return f"{int(x):,} B"
    if metric.endswith("_s"):
        return f"{sig(x * 1e3)} ms"
    if metric == "accuracy":
        return f"{x:.4f}"
    return f"{int(x):,}" if float(x).is_integer() else sig(x)


def judge(base: Side, new: Side, exact_only: bool = False, allow_missing: bool = False,
          across_versions: bool = False) -> list[Line]:
    """Every cell of BASE and NEW, each metric with its verdict; raises UserError when the runs cannot be compared."""
    versions = _comparable(base, new, exact_only, across_versions)
    (base_floor, base_aa), (new_floor, new_aa) = floor_of(list(base.rows.values())), floor_of(list(new.rows.values()))
    floor = DEFAULT_FLOOR if base_aa is None and new_aa is None else max(base_floor, new_floor)
    lines: list[Line] = []
    for ident in list(base.rows) + [i for i in new.rows if i not in base.rows]:
        b, n = base.rows.get(ident), new.rows.get(ident)
        if n is None:
            lines.append(Line(_label(b), "*", "", "", "", "not comparable" if allow_missing else "missing",
                              "only in BASE" + ("" if allow_missing else " (--allow-missing to accept)")))
        elif b is None:
            lines.append(Line(_label(n), "*", "", "", "", "not comparable", "only in NEW"))
        elif b.get("status") != "ok" or n.get("status") != "ok":
            same = b.get("status") == n.get("status")
            verdict = "same" if same else ("worse" if b.get("status") == "ok" else "not comparable")
            lines.append(Line(_label(b), "status", b.get("status", ""), n.get("status", ""), "", verdict,
                              "" if same else (n.get("reason") or b.get("reason") or "")))
        else:
            lines += _exact(b, n, versions)
            if not exact_only:
                lines += _measured_lines(b, n, base.samples.get(b["cell_key"]), new.samples.get(n["cell_key"]), floor)
    return lines


def _comparable(base: Side, new: Side, exact_only: bool, across_versions: bool) -> str:
    """Refuse what cannot be compared (exit 2); the versions that differ when --across-versions allows it."""
    if not new.rows:
        raise UserError(f"{new.path}/metrics.csv has no rows: nothing to compare")
    if not set(base.rows) & set(new.rows):
        raise UserError(f"{base.path} and {new.path} have no cell in common (other suites or options?)")
    versions = _diff(base.env, new.env, VERSIONS) if base.env and new.env else ""
    machine = "" if exact_only or not (base.env and new.env) else _diff(base.env, new.env, MACHINE)
    if (versions or machine) and not across_versions:
        raise UserError(f"not comparable: {'; '.join(x for x in (versions, machine) if x)} (pass --across-versions "
                        "to compare anyway)")
    wanted = EXACT if exact_only else (*EXACT, *MEASURED)
    lacking = [c for c in wanted if c in base.header and c not in new.header]
    if lacking:
        raise UserError(f"{new.path}/metrics.csv lacks the column{'s' * (len(lacking) > 1)} {', '.join(lacking)} that "
                        f"{base.path} measured")
    return versions


def _exact(b: dict, n: dict, versions: str) -> list[Line]:
    label, out = _label(b), []
    for metric in EXACT:
        if _f(b.get("replica")) == 1 or b.get(metric, "") == "" and n.get(metric, "") == "":
            continue
        bv, nv = _f(b.get(metric)), _f(n.get(metric))
        if metric == "checkpoint_bytes" and versions:
            out.append(Line(label, metric, _fmt(metric, bv), _fmt(metric, nv), "", "not comparable",
                            f"other versions: {versions}"))
            continue
        equal = bv == nv or (bv != bv and nv != nv)
        out.append(Line(label, metric, _fmt(metric, bv), _fmt(metric, nv), "" if equal else f"{nv - bv:+,.0f}",
                        "same" if equal else "worse", "" if equal else "exact quantity changed"))
    return out


def _measured_lines(b: dict, n: dict, bs: dict | None, ns: dict | None, floor: float) -> list[Line]:
    label, out = _label(b), []
    budget = _diff(_identity(b)[1], _identity(n)[1], sorted(set(_identity(b)[1]) | set(_identity(n)[1])))
    for metric in MEASURED:
        if _f(b.get("replica")) == 1 and metric != "step_time_s":
            continue
        bv, nv = _f(b.get(metric)), _f(n.get(metric))
        if bv != bv and nv != nv:
            continue
        busy = metric == "step_time_s" and (_f(b.get("interference_repeats")) > 0 or
                                            _f(n.get("interference_repeats")) > 0)
        why = budget and f"other budget: {budget}" or (bv != bv or nv != nv) and "measured on one side only" \
            or busy and "measured under interference (others used the CPU or the machine ran slow)"
        if why:
            out.append(Line(label, metric, _fmt(metric, bv), _fmt(metric, nv), "", "not comparable", why))
        else:
            out.append(_measured(label, metric, b, n, floor, (bs, ns)))
    return out


def _measured(label: str, metric: str, b: dict, n: dict, floor: float, repeats: tuple = (None, None)) -> Line:
    """A measured metric judged against its noise: the step time by its 95 % interval and the noise floor (by the
    floor alone when a side has one repeat), accuracy by two standard errors, memory by a fixed tolerance."""
    bv, nv = _f(b.get(metric)), _f(n.get(metric))
    if metric == "step_time_s":
        est = _step_ratio(b, n, *repeats)
        lo, hi = (est.low, est.high) if est.has_interval else (est.value, est.value)
        change = f"{sig(est.value)}×" + (f" ({sig(est.low)}–{sig(est.high)})" if est.has_interval else "")
        if lo > 1 and est.value - 1 > floor:
            verdict = "worse"
        elif hi < 1 and 1 - est.value > floor:
            verdict = "better"
        else:
            verdict = "same"
        why = f"noise floor ±{sig(100 * floor)} %" + ("" if est.has_interval else "; one repeat: no interval")
        return Line(label, metric, _fmt(metric, bv), _fmt(metric, nv), change, verdict, why)
    if metric == "accuracy":
        m = _f(b.get("test_examples")) or _f(n.get("test_examples"))
        se = math.sqrt(max(bv * (1 - bv), 1e-12) / m + max(nv * (1 - nv), 1e-12) / m) if m == m and m else 0.0
        d = nv - bv
        verdict = "worse" if d < -2 * se else "better" if d > 2 * se else "same"
        return Line(label, metric, _fmt(metric, bv), _fmt(metric, nv), f"{d:+.4f}", verdict,
                    f"2 standard errors = {2 * se:.4f}")
    tol = TOLERANCE[metric]
    r = nv / bv if bv else math.inf
    verdict = "worse" if r > 1 + tol else "better" if r < 1 - tol else "same"
    return Line(label, metric, _fmt(metric, bv), _fmt(metric, nv), f"{sig(r)}×", verdict,
                f"tolerance ±{sig(100 * tol)} %")


def render(lines: list[Line], fmt: str, base_env: dict, new_env: dict, base: Path, new: Path) -> str:
    if fmt == "json":
        return json.dumps({"base": str(base), "new": str(new), "base_commit": base_env.get("git_commit"),
                           "new_commit": new_env.get("git_commit"), "lines": [asdict(x) for x in lines]}, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(Line.__dataclass_fields__))
        w.writeheader()
        for x in lines:
            w.writerow(asdict(x))
        return buf.getvalue()
    head = [f"# peft-bench compare: `{base}` → `{new}`", "",
            f"Code: {str(base_env.get('git_commit', '?'))[:10]} → {str(new_env.get('git_commit', '?'))[:10]}. "
            + (f"Versions: {_diff(base_env, new_env, VERSIONS)}. " if _diff(base_env, new_env, VERSIONS) else "")
            + (f"Machine: {_diff(base_env, new_env, MACHINE)}. " if _diff(base_env, new_env, MACHINE) else ""), ""]
    order = ("missing", "worse", "better", "not comparable", "same")
    counts = {v: sum(x.verdict == v for x in lines) for v in order}
    head += [", ".join(f"{k}: {v}" for k, v in counts.items()), ""]
    shown = sorted(lines, key=lambda x: order.index(x.verdict))
    return "\n".join(head + table(["cell", "metric", "base", "new", "change", "verdict", "why"],
                                         [[x.cell, x.metric, x.base, x.new, x.change, x.verdict, x.why]
                                          for x in shown])) + "\n"


def compare(base: Path, new: Path, fmt: str = "markdown", exact_only: bool = False, allow_missing: bool = False,
            across_versions: bool = False) -> tuple[str, list[Line]]:
    if fmt not in ("markdown", "csv", "json"):
        raise UserError(f"unknown --format {fmt!r}; choose markdown, csv or json")
    b, n = _load(base), _load(new)
    lines = judge(b, n, exact_only, allow_missing, across_versions)
    return render(lines, fmt, b.env, n.env, base, new), lines
