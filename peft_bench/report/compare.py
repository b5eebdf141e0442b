"""`peft-bench compare BASE NEW`: what changed between two result directories, judged against the noise.

Cells are joined by identity (method, workload or model, device, dtype, seed, method options, replica). For each
joined cell and metric, one verdict:

* exact quantities (trainable and total parameters, static memory, checkpoint bytes) must be equal: any change
  is `worse` (a changed structure is a regression until the baseline is updated on purpose);
* step time is judged by the ratio NEW / BASE with a CI combined from both runs' bootstrap CIs: `worse` only
  when the CI lies above 1 and the ratio exceeds the noise floor (the larger A/A floor of the two runs, or
  10 % when neither measured one), `better` symmetrically, else `same`;
* the tensor peak (a deterministic count) within 1 %; the process peak within 10 % (the RSS high-water mark moves
  with allocator timing); accuracy within two standard errors of a difference of proportions;
* `not comparable` — other options or budget, other library versions or machine (for measured metrics), a cell
  present on one side only or not `ok` — shown with the reason, never hidden.

Exit status: 0 when nothing got worse, 1 when something did (each named on stderr), 2 on bad input.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import results
from ..config import SAME_CELL
from ..errors import UserError
from ..measure.repeats import floor_of
from ..measure.stats import Estimate
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


def _load(path: Path) -> tuple[list[dict], dict]:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; pass two result directories (each with metrics.csv)")
    if not (path / "metrics.csv").is_file():
        raise UserError(f"{path} has no metrics.csv; pass the --out directory of a run")
    rows = results.read_rows(path / "metrics.csv")
    env_path = path / "environment.json"
    try:
        env = json.loads(env_path.read_text()) if env_path.exists() else {}
    except json.JSONDecodeError:
        raise UserError(f"{env_path} is not valid JSON") from None
    return rows, env


def _identity(row: dict) -> tuple[str, dict]:
    spec = json.loads(row["cell_key"])
    spec.setdefault("replica", 0)
    ident = {k: spec.get(k) for k in IDENTITY}
    rest = {k: v for k, v in spec.items() if k not in IDENTITY}
    return json.dumps(ident, sort_keys=True), rest


def _label(row: dict) -> str:
    rep = " (A/A copy)" if str(row.get("replica", "0")) in ("1", "1.0") else ""
    return f"{row['method']} × {row['workload']}{rep}"


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _diff(a: dict, b: dict, keys) -> str:
    return ", ".join(f"{k} {a.get(k)} → {b.get(k)}" for k in keys if a.get(k) != b.get(k))


def _step_ratio(b: dict, n: dict) -> Estimate:
    """NEW / BASE with a CI from both runs' CIs, combined in log space (each side's half-widths in quadrature)."""
    bv, nv = _f(b["step_time_s"]), _f(n["step_time_s"])
    r = nv / bv
    blo, bhi = _f(b.get("step_time_ci_low_s")), _f(b.get("step_time_ci_high_s"))
    nlo, nhi = _f(n.get("step_time_ci_low_s")), _f(n.get("step_time_ci_high_s"))
    blo, bhi = (bv, bv) if blo != blo else (blo, bhi)
    nlo, nhi = (nv, nv) if nlo != nlo else (nlo, nhi)
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


def judge(base_rows: list[dict], base_env: dict, new_rows: list[dict], new_env: dict,
          exact_only: bool = False) -> list[Line]:
    (base_floor, base_aa), (new_floor, new_aa) = floor_of(base_rows), floor_of(new_rows)
    floor = DEFAULT_FLOOR if base_aa is None and new_aa is None else max(base_floor, new_floor)
    versions = _diff(base_env, new_env, VERSIONS) if base_env and new_env else ""
    machine = _diff(base_env, new_env, MACHINE) if base_env and new_env else ""
    base = {_identity(r)[0]: r for r in base_rows}
    new = {_identity(r)[0]: r for r in new_rows}
    lines: list[Line] = []
    for ident in list(base) + [i for i in new if i not in base]:
        b, n = base.get(ident), new.get(ident)
        if b is None or n is None:
            row = b or n
            lines.append(Line(_label(row), "*", "", "", "", "not comparable",
                              f"only in {'BASE' if n is None else 'NEW'}"))
            continue
        label = _label(b)
        if b.get("status") != "ok" or n.get("status") != "ok":
            same = b.get("status") == n.get("status")
            verdict = "same" if same else ("worse" if b.get("status") == "ok" else "not comparable")
            lines.append(Line(label, "status", b.get("status", ""), n.get("status", ""), "", verdict,
                              "" if same else (n.get("reason") or b.get("reason") or "")))
            continue
        options = _diff(_identity(b)[1], _identity(n)[1], sorted(set(_identity(b)[1]) | set(_identity(n)[1])))
        replica = str(b.get("replica", "0")) in ("1", "1.0")
        for metric in EXACT:
            if replica or b.get(metric, "") == "" and n.get(metric, "") == "":
                continue
            bv, nv = _f(b.get(metric)), _f(n.get(metric))
            if metric == "checkpoint_bytes" and versions:
                lines.append(Line(label, metric, _fmt(metric, bv), _fmt(metric, nv), "", "not comparable",
                                  f"other versions: {versions}"))
                continue
            equal = bv == nv or (bv != bv and nv != nv)
            lines.append(Line(label, metric, _fmt(metric, bv), _fmt(metric, nv),
                              "" if equal else f"{nv - bv:+,.0f}", "same" if equal else "worse",
                              "" if equal else "exact quantity changed"))
        if exact_only:
            continue
        for metric in MEASURED:
            if replica and metric != "step_time_s":
                continue
            bv, nv = _f(b.get(metric)), _f(n.get(metric))
            if bv != bv or nv != nv:
                continue
            why = options and f"other options: {options}" or versions and f"other versions: {versions}" \
                or machine and f"other machine: {machine}"
            if why:
                lines.append(Line(label, metric, _fmt(metric, bv), _fmt(metric, nv), "", "not comparable", why))
                continue
            lines.append(_measured(label, metric, b, n, floor))
    return lines


def _measured(label: str, metric: str, b: dict, n: dict, floor: float) -> Line:
    """A measured metric judged against its noise: the step time by its paired CI and the noise floor, accuracy by
    two standard errors, memory by a fixed tolerance."""
    bv, nv = _f(b.get(metric)), _f(n.get(metric))
    if metric == "step_time_s":
        est = _step_ratio(b, n)
        change = f"{sig(est.value)}× ({sig(est.low)}–{sig(est.high)})"
        if est.low > 1 and est.value - 1 > floor:
            verdict = "worse"
        elif est.high < 1 and 1 - est.value > floor:
            verdict = "better"
        else:
            verdict = "same"
        why = f"noise floor ±{sig(100 * floor)} %"
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
    counts = {v: sum(x.verdict == v for x in lines) for v in ("worse", "better", "same", "not comparable")}
    head += [", ".join(f"{k}: {v}" for k, v in counts.items()), ""]
    shown = sorted(lines, key=lambda x: ("worse", "better", "not comparable", "same").index(x.verdict))
    return "\n".join(head + table(["cell", "metric", "base", "new", "change", "verdict", "why"],
                                         [[x.cell, x.metric, x.base, x.new, x.change, x.verdict, x.why]
                                          for x in shown])) + "\n"


def compare(base: Path, new: Path, fmt: str = "markdown", exact_only: bool = False) -> tuple[str, list[Line]]:
    if fmt not in ("markdown", "csv", "json"):
        raise UserError(f"unknown --format {fmt!r}; choose markdown, csv or json")
    base_rows, base_env = _load(base)
    new_rows, new_env = _load(new)
    lines = judge(base_rows, base_env, new_rows, new_env, exact_only)
    return render(lines, fmt, base_env, new_env, base, new), lines
