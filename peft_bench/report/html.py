"""report.html: one self-contained page (no network: styles, script and plots inline) from a results folder's rows.

The environment and noise floor first; then per workload a table that sorts by any column (click its header) and a
filter by method over every table; each header carries its metric's one-line definition (hover), each cell its
unit and interval; the folder's PNG plots inline. A serving run (suite inference) adds its tables from summary.md.
Opening the page with `#sort=T,C` sorts table T by column C on load (how the browser test drives it).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from ..measure.records import definitions
from .format import ci, sig, size

# (header, column, how a cell is written); only columns the workload has values in are shown
COLUMNS = [
    ("method", "method", None),
    ("options", "method_config", None),
    ("trainable params", "trainable_params", lambda r: _unit(_int(r["trainable_params"]),
                                                             f" ({sig(_f(r, 'trainable_pct'))} %)")),
    ("tensor peak", "tensor_peak_bytes", lambda r: size(_f(r, "tensor_peak_bytes"))),
    ("process peak", "process_peak_bytes", lambda r: size(_f(r, "process_peak_bytes"))),
    ("step time (95 % CI)", "step_time_s", lambda r: _interval(r, "step_time_s", "step_time_ci_low_s",
                                                                "step_time_ci_high_s", 1e3, " ms")),
    ("step time ÷ full (95 % CI)", "step_time_vs_full", lambda r: _interval(r, "step_time_vs_full",
                                                                             "step_time_vs_full_ci_low",
                                                                             "step_time_vs_full_ci_high", 1, "×")),
    ("samples/s", "samples_per_s", lambda r: sig(_f(r, "samples_per_s"))),
    ("inference unmerged", "inference_adapter_s", lambda r: _unit(sig(_f(r, "inference_adapter_s") * 1e3), " ms")),
    ("checkpoint", "checkpoint_bytes", lambda r: size(_f(r, "checkpoint_bytes"))),
    ("accuracy (95 % Wilson CI)", "accuracy", lambda r: _interval(r, "accuracy", "accuracy_ci_low", "accuracy_ci_high",
                                                                  100, " %")),
    ("repeats", "repeats", lambda r: _int(r["repeats"])),
    ("status", "status", None),
]

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2328;max-width:1500px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}p.env{color:#57606a}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f6f8fa;cursor:pointer;user-select:none}th[title]{text-decoration:underline dotted}
td:first-child,th:first-child,td.text,th.text{text-align:left}
td.text:not(:first-child){white-space:normal;max-width:280px}tr.disturbed td{background:#fff8c5}
th.asc::after{content:" ▲"}th.desc::after{content:" ▼"}img{max-width:100%;border:1px solid #d0d7de;margin:8px 0}
#filter{font-size:14px;padding:4px 8px;width:320px}
"""

SCRIPT = """
function cellValue(td){const v=td.getAttribute('data-v');return v===null||v===''?td.textContent.trim():parseFloat(v);}
function sortTable(table,col){
  const th=table.tHead.rows[0].cells[col];const asc=!th.classList.contains('asc');
  for(const h of table.tHead.rows[0].cells){h.classList.remove('asc','desc');}
  th.classList.add(asc?'asc':'desc');
  const rows=Array.from(table.tBodies[0].rows);
  rows.sort((a,b)=>{const x=cellValue(a.cells[col]),y=cellValue(b.cells[col]);
    if(typeof x==='number'&&typeof y==='number'){if(isNaN(x))return 1;if(isNaN(y))return -1;return asc?x-y:y-x;}
    return asc?String(x).localeCompare(String(y)):String(y).localeCompare(String(x));});
  for(const r of rows){table.tBodies[0].appendChild(r);}
}
function filterRows(text){
  const want=text.trim().toLowerCase();
  for(const tr of document.querySelectorAll('table.results tbody tr')){
    const m=tr.cells[0].textContent.toLowerCase();tr.style.display=!want||m.includes(want)?'':'none';}
}
document.addEventListener('DOMContentLoaded',()=>{
  const tables=document.querySelectorAll('table.results');
  tables.forEach(t=>Array.from(t.tHead.rows[0].cells).forEach((th,i)=>th.addEventListener('click',()=>sortTable(t,i))));
  document.getElementById('filter').addEventListener('input',e=>filterRows(e.target.value));
  const m=location.hash.match(/sort=(\\d+),(\\d+)/);
  if(m&&tables[+m[1]]){sortTable(tables[+m[1]],+m[2]);}
  document.body.setAttribute('data-ready','1');
});
"""


def _f(r: dict, col: str) -> float:
    try:
        return float(r.get(col))
    except (TypeError, ValueError):
        return math.nan


def _unit(text: str, unit: str) -> str:
    return f"{text}{unit}" if text else ""


def _int(x) -> str:
    try:
        return f"{int(float(x)):,}"
    except (TypeError, ValueError):
        return ""


def _interval(r: dict, col: str, low: str, high: str, scale: float, unit: str) -> str:
    return ci(_f(r, col), _f(r, low), _f(r, high), scale, unit) if _f(r, col) == _f(r, col) else ""


def _has(rows: list[dict], col: str) -> bool:
    return any(str(r.get(col, "")).strip() not in ("", "nan", "None") for r in rows)


TEXT = ("method", "method_config", "status")


def _th_class(col: str) -> str:
    return ' class="text"' if col in TEXT else ""


def workload_table(rows: list[dict]) -> str:
    """One workload's rows as a sortable table: numeric cells carry their value (data-v) for sorting."""
    defs = definitions()
    cols = [c for c in COLUMNS if _has(rows, c[1])]
    head = "".join(f'<th{_th_class(col)} title="{html.escape(defs.get(col, ""))}">{html.escape(label)}</th>'
                   if defs.get(col) else f"<th{_th_class(col)}>{html.escape(label)}</th>" for label, col, _ in cols)
    body = []
    for r in rows:
        cells = []
        for _, col, fmt in cols:
            text = fmt(r) if fmt and r.get("status") == "ok" else str(r.get(col, "") or "")
            if col == "method" and _f(r, "replica") == 1:
                text += " (A/A copy)"
            v = _f(r, col)
            attr = f' data-v="{v!r}"' if v == v else ' class="text"'
            tip = f' title="{html.escape(str(r.get("reason") or ""))}"' if col == "status" and r.get("reason") else ""
            cells.append(f"<td{attr}{tip}>{html.escape(text)}</td>")
        mark = ' class="disturbed"' if _f(r, "interference_repeats") > 0 else ""
        body.append(f"<tr{mark}>{''.join(cells)}</tr>")
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def markdown_tables(lines: list[str]) -> str:
    """The headings, paragraphs and tables of generated markdown (a serving summary) as HTML; tables sortable."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block[0])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in block[2:])
            out.append(f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')
            continue
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip() and not line.startswith("!["):
            out.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(out)


def page(title: str, env_lines: list[str], sections: list[str], plots: list[Path]) -> str:
    """The whole page: environment, a filter, the sections, the plots inline."""
    imgs = "".join(f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img alt="{html.escape(p.name)}" '
                   f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in plots)
    env = "".join(f'<p class="env">{html.escape(x)}</p>' for x in env_lines if x)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body><h1>{html.escape(title)}</h1>{env}"
            '<p><label>Filter by method: <input id="filter" placeholder="e.g. lora"></label> '
            "(click a column header to sort; hover a header for its definition; yellow rows: a repeat was "
            f"disturbed)</p>{''.join(sections)}{imgs}</body></html>\n")


def write(out: Path, df, env: dict, extra: list[str] | None = None) -> Path:
    """DIR/report.html from the rows of `df` (and a serving run's markdown sections in `extra`)."""
    from .summary import floor_of_frame, made_by

    floor, _ = floor_of_frame(df)
    env_lines = made_by(env) + [f"Noise floor (A/A): identical cells land up to {sig(100 * floor)} % apart."
                                if floor else "Noise floor: not measured (no A/A copy in this run)."]
    sections = []
    for wl in sorted(df.workload.dropna().unique()):
        rows = [{k: ("" if v != v else v) if isinstance(v, float) else v for k, v in r.items()}
                for r in df[df.workload == wl].to_dict("records")]
        sections.append(f"<h2>{html.escape(str(wl))}</h2>{workload_table(rows)}")
    if extra:
        sections.append(markdown_tables(extra))
    path = out / "report.html"
    from ..results import atomic_write_text

    atomic_write_text(path, page(f"peft-bench: {out.name}", env_lines, sections, sorted(out.glob("*.png"))))
    return path
