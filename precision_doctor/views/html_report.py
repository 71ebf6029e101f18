"""A standalone HTML report: the app's plotly figures and tables in one file that opens
without a server or network. Every report string is HTML-escaped.

plotly.js is embedded once for the whole page: plotly.js's "basic" bundle (scatter and bar
traces, all these figures use), shipped gzipped beside this module and inflated by the
browser's own DecompressionStream: about 0.5 MB in the page against 4.8 MB for the plotly
package's full bundle inline. Each figure is its JSON (the shared template once, not per
figure), drawn by one script after plotly.js loads. Where the basic bundle is missing, the
plotly package's full bundle is inlined instead.

The bundle is npm's plotly.js-basic-dist-min 4.1.1 (the plotly.js that plotly 7.1 ships),
`gzip -9 -n plotly-basic.min.js`; to update it, repack the version the pinned plotly ships."""

from __future__ import annotations

import html
import os
from base64 import b64encode
from functools import cache
from pathlib import Path
from typing import Any

from precision_doctor.report import Report, Unit, write_atomic
from precision_doctor.views.figures import (
    FONT,
    TEMPLATE_LAYOUT,
    depth_figure,
    distributed_text,
    error_rows,
    export_file,
    flag_counts,
    flag_rows,
    fmt,
    grad_fidelity_figure,
    grad_fidelity_rows,
    grad_fidelity_text,
    histogram_figure,
    layer_rows,
    loss_scale_figure,
    loss_scale_rows,
    monitor_items,
    optimizer_step_rows,
    optimizer_step_text,
    ordered_units,
    overview_items,
    plan_cost_figure,
    plan_cost_rows,
    preflight_run_rows,
    preflight_verdict,
    rank_rows,
    recommendation_run,
    takeoff_unit,
    training_figure,
)
from precision_doctor.views.fp8 import (
    fp8_exclusion_rows,
    fp8_figure,
    fp8_gemm_rows,
    fp8_layer_rows,
    fp8_recipe_layer_rows,
    fp8_recipe_loss_rows,
    fp8_role_rows,
    fp8_scaling_rows,
    fp8_summary_lines,
)

MAX_DETAIL_UNITS = 30
"""Units given histograms: the flagged ones first. Each costs two figures of file size."""

PLOTLY_BASIC = Path(__file__).resolve().parent / "assets" / "plotly-basic.min.js.gz"
"""plotly.js's basic bundle (plotly.js-basic-dist-min, MIT, see the LICENSE beside it), gzipped."""

_CSS = """
*, *::before, *::after { box-sizing: border-box; }
body { font-family: __FONT__;
       margin: 0 auto; padding: 1.5em 2em; max-width: 1400px; color: #31333f; background: #fff; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #e6e6e6; padding-bottom: .2em; margin-top: 2em; }
h3 { overflow-wrap: anywhere; }
.scroll { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
th, td { border: 1px solid #e6e6e6; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f6f6f8; cursor: pointer; white-space: nowrap; }
td { overflow-wrap: break-word; max-width: 40em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.verdict { font-size: 1.15em; font-weight: bold; padding: .6em; border-radius: 4px; overflow-wrap: anywhere; }
.bad { background: #fde8e8; color: #9b1c1c; } .ok { background: #e6f6ea; color: #1b5e20; }
.warn { background: #fff4e0; padding: .5em; }
.pd-plot { width: 100%; min-width: 0; }
.pair { display: flex; flex-wrap: wrap; gap: 1em; } .pair > div { flex: 1 1 420px; min-width: 0; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; max-height: 20em; }
code { overflow-wrap: anywhere; }
""".replace("__FONT__", FONT)  # the figures' font (one theme)

# Click a header to sort; the filter box matches unit names and flags. Plain DOM, no network.
_JS = """
function pdSort(th) {
  const table = th.closest('table'), idx = [...th.parentNode.children].indexOf(th);
  const body = table.tBodies[0], rows = [...body.rows];
  const asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
  const key = r => { const c = r.cells[idx]; const v = c.dataset.v;
    return v !== undefined ? parseFloat(v) : c.textContent; };
  rows.sort((a, b) => { const x = key(a), y = key(b);
    const c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return asc ? c : -c; });
  rows.forEach(r => body.appendChild(r));
}
function pdFilter(input) {
  const q = input.value.toLowerCase();
  for (const r of document.getElementById('layers').tBodies[0].rows)
    r.style.display = r.textContent.toLowerCase().includes(q) ? '' : 'none';
}
"""

# Load plotly.js once (inflating the gzipped bundle), then draw every figure from its JSON.
_LOADER = """
(function () {
  function draw() {
    const template = JSON.parse(document.getElementById('pd-template').textContent);
    for (const el of document.querySelectorAll('script.pd-fig')) {
      const f = JSON.parse(el.textContent);
      f.layout.template = template;
      Plotly.newPlot(el.dataset.target, f.data, f.layout, {displaylogo: false, responsive: true});
    }
  }
  async function load() {
    const src = document.getElementById('pd-plotly');
    if (src) {
      const bytes = Uint8Array.from(atob(src.textContent.trim()), c => c.charCodeAt(0));
      const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
      const s = document.createElement('script');
      s.textContent = await new Response(stream).text();
      document.head.appendChild(s);
    }
    draw();
  }
  load().catch(e => {
    const n = document.getElementById('pd-plotly-error');
    n.hidden = false; n.textContent += ' (' + e + ')';
  });
})();
"""


@cache
def _plotly_js() -> tuple[str, str]:
    """("gzip", base64 of the basic bundle), or ("plain", the plotly package's full bundle)."""
    if PLOTLY_BASIC.is_file():
        return "gzip", b64encode(PLOTLY_BASIC.read_bytes()).decode("ascii")
    from plotly.offline import get_plotlyjs

    return "plain", get_plotlyjs()


def _script_json(data: object) -> str:
    """JSON safe inside a <script> element (no `</` can close it)."""
    from plotly.io.json import to_json_plotly

    text: str = to_json_plotly(data)
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return f"<td>{_e('-' if v is None else v)}</td>"
    if isinstance(v, int):
        return f'<td class="num" data-v="{v}">{v}</td>'
    if isinstance(v, float):
        # data-v keeps sorting numeric; inf/nan sort as JS parses them.
        sort = "Infinity" if v == float("inf") else "-Infinity" if v == float("-inf") else repr(v)
        return f'<td class="num" data-v="{sort}">{_e(fmt(v))}</td>'
    return f"<td>{_e(v)}</td>"


def _table(rows: list[dict[str, Any]], table_id: str | None = None) -> str:
    if not rows:
        return "<p>none</p>"
    cols = list(rows[0])
    ident = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f'<th onclick="pdSort(this)">{_e(c)}</th>' for c in cols)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in cols) + "</tr>" for r in rows)
    return f'<div class="scroll"><table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


class _Figures:
    """Turns figures into a <div> and the figure's JSON beside it (its template dropped: the
    page holds the shared one once); `page_scripts` loads plotly.js once and draws them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, fig: Any) -> str:
        spec = fig.to_plotly_json()
        spec["layout"].pop("template", None)
        target = f"pd-fig-{self.count}"
        self.count += 1
        return (
            f'<div class="pd-plot" id="{target}"></div>'
            f'<script type="application/json" class="pd-fig" data-target="{target}">'
            f"{_script_json({'data': spec['data'], 'layout': spec['layout']})}</script>"
        )

    def page_scripts(self) -> str:
        if not self.count:
            return ""
        kind, code = _plotly_js()
        plotly = (
            f'<script type="application/octet-stream" id="pd-plotly">{code}</script>'
            if kind == "gzip"
            else f'<script type="text/javascript">{code}</script>'
        )
        return (
            f'<p id="pd-plotly-error" class="warn" hidden>The figures could not be drawn: this browser '
            f"cannot inflate the embedded plotly.js</p>\n"
            f'<script type="application/json" id="pd-template">{_script_json(TEMPLATE_LAYOUT)}</script>\n'
            f"{plotly}\n<script>{_LOADER}</script>"
        )


def _detail_units(report: Report) -> list[Unit]:
    flagged = report.flagged_units()
    rest = [u for u in ordered_units(report) if not u.flags and u.forward.stats is not None]
    return (flagged + rest)[:MAX_DETAIL_UNITS] if flagged else rest[: min(5, MAX_DETAIL_UNITS)]


def _overview(report: Report) -> list[str]:
    items = overview_items(report, report.extras.plan)
    half = (len(items) + 1) // 2  # label/value pairs in two columns, as the app shows them
    columns = "".join(
        f"<div>{_table([{'': k, 'value': v} for k, v in chunk])}</div>" for chunk in (items[:half], items[half:])
    )
    counts = flag_counts(report)
    return [
        "<h2>Overview</h2>",
        f'<div class="pair" id="overview">{columns}</div>',
        "<p>Flagged units by flag:</p>" + _table([counts]) if counts else "<p>No flags.</p>",
    ]


def _ranks(report: Report) -> list[str]:
    if not report.ranks:
        return []
    return [
        '<h2 id="ranks">Ranks</h2>',
        f"<p>{_e(distributed_text(report))}: the units and flags above combine every rank's "
        "statistics; below, each rank judged on its own.</p>",
        _table(rank_rows(report)),
    ]


def _layers(report: Report) -> list[str]:
    parts = [
        "<h2>Layers</h2>",
        '<p><input type="search" placeholder="filter by name or flag" oninput="pdFilter(this)"> '
        "(click a column header to sort)</p>",
        _table(layer_rows(report, report.extras.plan), "layers"),
    ]
    if report.flags():
        parts.append("<h3>Flags, worst first</h3>" + _table(flag_rows(report)))
    return parts


def _depth(report: Report, fig: _Figures) -> list[str]:
    parts = ["<h2>Depth</h2>"]
    start = takeoff_unit(report)
    if start is not None:
        parts.append(f"<p>Error takes off at <code>{_e(start.name)}</code> (execution order {start.order}).</p>")
    parts.append(fig(depth_figure(report)))
    return parts


def _gradients(report: Report, fig: _Figures) -> list[str]:
    gradients = grad_fidelity_text(report)
    if gradients is None:
        return []
    return [
        '<h2 id="gradients">Gradients</h2>',
        f'<p id="grad-fidelity">{_e(gradients)}.</p>',
        fig(grad_fidelity_figure(report)),
    ]


def _optimizer_step(report: Report) -> list[str]:
    step_text = optimizer_step_text(report)
    if step_text is None:
        return []
    return [
        '<h2 id="optimizer-step">Optimizer step</h2>',
        f"<p>{_e(step_text)}.</p>" + _table(optimizer_step_rows(report), "optimizer-step-units"),
    ]


def _loss_scale(report: Report, fig: _Figures) -> list[str]:
    ls = report.extras.loss_scale
    parts = ["<h2>Loss scale</h2>"]
    if ls is not None:
        parts.append(
            f'<p id="recommended-scale">Recommended initial loss scale: 2^{ls.recommended_scale_log2} '
            f"(default 2^{ls.default_scale_log2}), for the {_e(recommendation_run(report))}'s gradients. "
            "The curve below is the all-low run's (every unit low).</p>"
        )
        parts.append(_table(loss_scale_rows(report, ls), "loss-scale-numbers"))
    if report.loss_scale:
        parts.append(fig(loss_scale_figure(report, ls)))
    else:
        parts.append("<p>No gradient statistics in this report.</p>")
    return parts


def _fp8(report: Report, fig: _Figures) -> list[str]:
    fp8 = report.extras.fp8
    if fp8 is None:
        return []
    parts = [
        '<h2 id="fp8">fp8</h2>',
        "".join(f"<p>{_e(line.strip())}</p>" for line in fp8_summary_lines(report)),
        "<h3>Conventional exclusions, judged on this model</h3>" + _table(fp8_exclusion_rows(fp8), "fp8-exclusions"),
        "<h3>Per layer and role</h3>" + _table(fp8_role_rows(fp8), "fp8-roles") + fig(fp8_figure(fp8)),
        "<h3>Matmuls per recipe (SQNR, dB)</h3>" + _table(fp8_gemm_rows(fp8), "fp8-gemms"),
        "<h3>Casts</h3>" + _table(fp8_layer_rows(fp8), "fp8-casts"),
    ]
    comparison = report.extras.fp8_recipes
    if comparison is not None:
        parts += [
            f'<h3 id="fp8-recipes">Recipes side by side (fp32 loss {_e(fmt(comparison.loss_fp32, ".6g"))})</h3>',
            _table(fp8_recipe_loss_rows(comparison), "fp8-recipe-losses"),
            _table(fp8_recipe_layer_rows(comparison), "fp8-recipe-layers"),
        ]
    return parts


def _plan(report: Report, fig: _Figures) -> list[str]:
    plan = report.extras.plan
    if plan is None:
        return []
    parts = [
        "<h2>Plan</h2>",
        f"<p>Target {_e(plan.target)}, low dtype {_e(plan.dtype)}; "
        f"{sum(1 for d in plan.units.values() if d == 'fp32')} of {len(plan.units)} units stay fp32.</p>",
        "<h3>Units kept in fp32</h3>" + _table([r.model_dump() for r in plan.fp32_units]),
        "<h3>Cost</h3>" + _table(plan_cost_rows(plan)) + fig(plan_cost_figure(plan)),
        f"<p>Verified final-loss rel error (planned run) {_e(fmt(plan.verified_loss_rel_error, '.2e'))} "
        f"in {_e(plan.verification_passes)} pass(es).</p>",
    ]
    for name, text in plan.exports.items():
        fname, mime = export_file(name)
        # A data: URI keeps the download working with no server.
        uri = f"data:{mime};base64,{b64encode(text.encode()).decode()}"
        parts.append(
            f'<details><summary>{_e(name)} export: <a download="{_e(fname)}" href="{uri}">'
            f"{_e(fname)}</a></summary><pre>{_e(text)}</pre></details>"
        )
    return parts


def _training(report: Report, fig: _Figures) -> list[str]:
    pre, mon = report.extras.preflight, report.extras.scaler_monitor
    if pre is None and mon is None:
        return []
    parts = ['<h2 id="training">Training</h2>']
    if pre is not None:
        parts.append(f'<p class="verdict {"ok" if pre.go else "bad"}" id="preflight">{_e(preflight_verdict(pre))}</p>')
        if pre.reasons:
            parts.append(_table([r.model_dump() for r in pre.reasons]))
        parts.append(_table(preflight_run_rows(pre)))
        if pre.fp8_scaling is not None:
            parts.append(
                f"<h3>fp8 delayed scaling, modelled ({_e(pre.fp8_scaling.recipe)}; the "
                f"{_e(pre.fp8_scaling.run)} run's fp8 layers)</h3>"
                + _table(fp8_scaling_rows(pre.fp8_scaling), "fp8-delayed-scaling")
            )
    if mon is not None:
        parts.append("<h3>The real run's GradScaler</h3>" + _table([monitor_items(mon)]))
    parts.append(fig(training_figure(pre, mon)))
    return parts


def _unit_detail(report: Report, fig: _Figures) -> list[str]:
    parts = ["<h2>Unit detail</h2>"]
    units = _detail_units(report)
    if len(units) < len(report.units):
        parts.append(
            f"<p>Histograms for {len(units)} of {len(report.units)} units "
            f"({'flagged first' if report.flagged_units() else 'first in execution order'}); "
            "the app shows every unit.</p>"
        )
    for u in units:
        parts += _unit(report, u, fig)
    return parts


def _unit(report: Report, u: Unit, fig: _Figures) -> list[str]:
    dtype = report.environment.dtype
    parts = [f'<h3 class="unit"><code>{_e(u.name)}</code> ({_e(u.kind)})</h3>']
    if u.flags:
        parts.append(_table(flag_rows(report, u)))
    parts.append(_table(error_rows(u)))
    if u.backward.param_grad_fidelity:
        parts.append("<p>Parameter gradients in the low run against fp32's:</p>" + _table(grad_fidelity_rows(u)))
    figs = []
    if u.forward.stats is not None:
        figs.append(fig(histogram_figure(u.forward.stats, dtype, f"{u.name}: forward")))
    if u.backward.stats is not None:
        figs.append(fig(histogram_figure(u.backward.stats, dtype, f"{u.name}: gradient")))
    if figs:
        parts.append('<div class="pair">' + "".join(f"<div>{f}</div>" for f in figs) + "</div>")
    return parts


def _footer(report: Report) -> list[str]:
    env = report.environment
    return [
        f"<p><small>precision-doctor {_e(env.tool_version)}, torch {_e(env.torch_version)}, "
        f"python {_e(env.python_version)}, {_e(env.platform)}</small></p>"
    ]


def render_html(report: Report) -> str:
    """The whole report as one HTML document: its sections in the app's order."""
    fig = _Figures()  # numbers the figures in page order: the sections are built in that order
    sections = [
        [f"<h1>precision-doctor: {_e(report.model)}</h1>"],
        [f'<p class="verdict {"ok" if report else "bad"}" id="verdict">{_e(report.verdict)}</p>'],
        _overview(report),
        _ranks(report),
        _layers(report),
        _depth(report, fig),
        _gradients(report, fig),
        _optimizer_step(report),
        _loss_scale(report, fig),
        _fp8(report, fig),
        _plan(report, fig),
        _training(report, fig),
        _unit_detail(report, fig),
        _footer(report),
    ]
    body = "\n".join(part for section in sections for part in section)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>precision-doctor: {_e(report.model)}</title>"
        f"<style>{_CSS}</style><script>{_JS}</script></head>\n<body>\n{body}\n{fig.page_scripts()}\n</body></html>\n"
    )


def write_html(report: Report, path: str | os.PathLike[str]) -> None:
    """Write the standalone HTML report atomically."""
    write_atomic(Path(path), render_html(report))
