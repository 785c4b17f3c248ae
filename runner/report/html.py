"""report.html: one self-contained page per sweep folder (relative links only, no network resources).

Plan summary, the ranking (sortable), response curves, the grids, failures, timings and the exact
command and config to reproduce the sweep. Every image is linked by a path relative to the folder,
so the folder can be zipped, moved or served as it is.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from runner.families import label
from runner.plan import summarize

SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.tabIndex = 0; th.setAttribute('role', 'button'); th.title = 'sort by this column (click, Enter or Space)';
  th.addEventListener('keydown', function (event) {
    if (event.key === 'Enter' || event.key === ' ') { event.preventDefault(); th.click(); }
  });
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var up = th.dataset.dir !== 'up'; th.dataset.dir = up ? 'up' : 'down';
    th.closest('tr').querySelectorAll('th').forEach(function (other) { other.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', up ? 'ascending' : 'descending');
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
window.addEventListener('load', function () {
  var broken = Array.prototype.filter.call(document.images, function (im) { return !im.complete || im.naturalWidth === 0; });
  document.body.dataset.brokenImages = String(broken.length);
  document.body.dataset.loaded = 'yes';
});
"""

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px; color: #222; padding: 0 16px; }
.scroll { overflow-x: auto; } .scroll table { font-size: 12.5px; }
h1 { margin-bottom: 0; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.muted { color: #666; } table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: middle; }
th { background: #f4f4f4; cursor: pointer; user-select: none; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eef8ee; } img.thumb { width: 40px; height: auto; margin: 0 1px; vertical-align: middle; }
td.thumbs { white-space: nowrap; } td.cell { min-width: 220px; }
img.grid, img.plot { max-width: 100%; border: 1px solid #eee; } pre { background: #f6f6f6; padding: 10px; overflow-x: auto; }
.facts td:first-child { color: #666; } .error { color: #a00; } img.best { width: 128px; margin: 2px; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td class='num' data-v=''>–</td>"
    return f"<td class='num' data-v='{float(value):.6g}'>{float(value):.{digits}f}</td>"


def _facts(items: list[tuple[str, str]]) -> str:
    return "<table class='facts'>" + "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in items) + "</table>"


def ranking_section(ranking: pd.DataFrame, rank_by: str | None, scores: list[str]) -> str:
    if ranking.empty:
        hint = "set <code>sweep.scores</code> (for example <code>[clip_score, lora_effect, seed_spread]</code>) to rank cells"
        return f"<h2 id='ranking'>Ranking</h2><p class='muted'>No scores yet: {hint}, or run <code>lora-sweep score FOLDER</code>.</p>"
    value_columns = [c for c in ranking.columns if c.endswith(("_mean", "_std")) or c in ("ci_low", "ci_high")]
    head = "".join(f"<th>{_e(c)}</th>" for c in ["rank", "cell", "images", *value_columns, "seeds"])
    body = []
    for record in ranking.to_dict("records"):
        thumbs = "".join(
            f"<a href='images/{_e(i)}.png'><img class='thumb' src='images/{_e(i)}.png' alt='{_e(i)}'></a>"
            for i in str(record["ids"]).split()
        )
        cells = [
            f"<td class='num'>{record['rank']}</td>",
            f"<td class='cell'>{_e(record['cell'])}</td>",
            f"<td class='num'>{record['images']}</td>",
        ]
        cells += [_num(record[c]) for c in value_columns]
        cells.append(f"<td class='thumbs'>{thumbs}</td>")
        body.append(f"<tr class='{'best' if record['rank'] == 1 else ''}' data-cell='{_e(record['cell'])}'>{''.join(cells)}</tr>")
    note = (
        f"<p class='muted'>Cells (every field but the seed) by mean <b>{_e(rank_by)}</b> across seeds, best first; "
        "<code>_std</code> is the spread across seeds, <code>ci_low..ci_high</code> a 95% bootstrap interval of the mean. "
        "Click a column to sort. Also in <a href='ranking.csv'>ranking.csv</a>.</p>"
    )
    table = f"<table class='sortable' id='ranking-table'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    table = f"<div class='scroll'>{table}</div>"
    return f"<h2 id='ranking'>Ranking</h2>{note}{table}"


def _with_family(model_id: str, ok: pd.DataFrame) -> str:
    """'fluxy (Flux.1)': the family the engine ran the model as (each image's meta.family), where it is known."""
    column = ok.get("meta.family")
    if column is None:
        return model_id
    families = column[ok["model_id"] == model_id].dropna().unique()
    return f"{model_id} ({', '.join(label(f) for f in families)})" if len(families) else model_id


def checkpoint_section(table: pd.DataFrame | None, rank_by: str | None) -> str:
    """The best checkpoint and strength of each training run, with its interval (checkpoints.csv has them all)."""
    if table is None or table.empty or rank_by is None:
        return ""
    lines = []
    for run, rows in table.groupby("run", sort=False):
        best = rows.sort_values(f"{rank_by}_mean", ascending=False).iloc[0]
        lines.append(
            f"<li><b>{_e(run)}</b>: best <b>{_e(best['checkpoint'])}</b> (step {int(best['step'])}) at strength "
            f"{best['strength']:g}: {rank_by} {_num(best[f'{rank_by}_mean'])} [{_num(best['ci_low'])}, {_num(best['ci_high'])}] "
            f"over {int(best['images'])} images, of {rows['checkpoint'].nunique()} checkpoints</li>"
        )
    return (
        "<h2 id='checkpoints'>Checkpoints</h2><ul>"
        + "".join(lines)
        + "</ul><p class='muted'>All of them: checkpoints.csv; the heatmap and curves are with the response curves.</p>"
    )


def write_html(
    root: Path,
    *,
    name: str,
    description: str,
    plan: pd.DataFrame,
    results: pd.DataFrame,
    ranking: pd.DataFrame,
    rank_by: str | None,
    scores: list[str],
    curves: list[Path],
    grids: list[Path],
    config_text: str,
    command: str,
    identity: dict,
    checkpoints: pd.DataFrame | None = None,
    human: Any = None,
    lora_files: dict[str, dict[str, str]] | None = None,
) -> Path:
    """report.html: what the sweep is, how far it got, the ranking, curves and grids, the files and how to reproduce it."""
    info = summarize(plan)
    table = plan.merge(results, on="id", how="left", suffixes=("", "_result"))
    ok = table[table["status"] == "ok"]
    failed = table[table["status"] == "failed"]
    pending = len(plan) - len(ok) - len(failed)
    axes = ", ".join(f"{_e(k)} ({v})" for k, v in info["axes"].items()) or "none"
    kinds = {"models": "model", "loras": "LoRA", "vaes": "VAE", "embeddings": "embeddings", "upscaler": "upscaler"}
    about = lora_files or {}
    files = "".join(
        f"<tr><td>{_e(kinds.get(kind, kind))}</td><td><b>{_e(k)}</b></td><td><code>{_e(str(v)[:10])}</code></td>"
        f"<td>{_lora_about(about.get(k)) if kind == 'loras' else ''}</td></tr>"
        for kind, group in identity.items()
        for k, v in group.items()
    )
    generation = pd.to_numeric(ok.get("generation_s"), errors="coerce") if len(ok) else pd.Series(dtype=float)
    state = (
        "finished"
        if pending == 0
        else f"<b>{pending} images not generated yet</b> (running or interrupted; run the command again to continue)"
    )
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(name)}: lora-sweep report</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(name)}</h1><p class='muted'>{_e(description)}</p>",
        "<p><a href='grid.html'><b>grid page</b></a> (choose axes, open images, compare) · "
        + ("<a href='#search'>search</a> · " if (root / "search" / "search.json").exists() else ""),
        "<a href='#ranking'>ranking</a> · <a href='#votes'>people's votes</a> · "
        "<a href='#curves'>response curves</a> · <a href='#grids'>grids</a> · "
        "<a href='#failures'>failures</a> · <a href='#timings'>timings</a> · <a href='#reproduce'>reproduce</a> · "
        "<a href='#images'>all images</a></p>",
        "<h2 id='summary'>Plan</h2>",
        _facts(
            [
                ("images", f"{len(plan)} planned: {len(ok)} ok, {len(failed)} failed; {state}"),
                ("axes", axes),
                ("models", _e(", ".join(_with_family(m, ok) for m in info["models"]))),
                ("blends", str(info["blends"])),
                ("scores", _e(", ".join(scores) or "none")),
                ("report written", time.strftime("%Y-%m-%d %H:%M:%S")),
            ]
        ),
        (
            "<table class='files'><thead><tr><th>file</th><th>id</th><th>sha256</th><th>what the file says (LoRAs)</th></tr></thead>"
            f"<tbody>{files}</tbody></table>"
        )
        if files
        else "",
        search_section(root, table),
        ranking_section(ranking, rank_by, scores),
        checkpoint_section(checkpoints, rank_by),
        votes_section(human, root),
        "<h2 id='curves'>Response curves</h2>",
        "".join(f"<p><img class='plot' src='{_e(p.relative_to(root).as_posix())}' alt='response curves'></p>" for p in curves)
        or "<p class='muted'>No curves: they need scores and LoRAs at more than one strength.</p>",
        "<p class='muted'>Each LoRA's mean score (bars: spread across images) against its strength; the no-LoRA images are strength 0.</p>"
        if curves
        else "",
        "<h2 id='grids'>Grids</h2>",
        "".join(grid_html(p, root) for p in grids) or "<p class='muted'>No grids yet.</p>",
        "<h2 id='failures'>Failures</h2>",
        (
            "<table><tr><th>id</th><th>cell</th><th>seed</th><th>error</th></tr>"
            + "".join(failure_row(r) for r in failed.to_dict("records"))
            + "</table><p class='muted'>Run again with <code>retry_failed=true</code> to retry only these.</p>"
        )
        if len(failed)
        else "<p>None.</p>",
        "<h2 id='timings'>Timings</h2>",
        _facts(
            [
                ("generation, all images", f"{generation.sum():.1f} s" if len(generation) else "–"),
                ("per image", f"{generation.mean():.3f} s mean, {generation.median():.3f} s median" if len(generation) else "–"),
                ("batch sizes", _e(", ".join(str(int(b)) for b in sorted(ok["batch_size"].dropna().unique())) if len(ok) else "–")),
                ("first / last image", _e(f"{ok['finished_at'].min()} / {ok['finished_at'].max()}") if len(ok) else "–"),
            ]
        ),
        "<h2 id='reproduce'>Reproduce</h2>",
        f"<p>The command that made this sweep (run it again to continue or regenerate):</p><pre>{_e(command)}</pre>",
        "<p>One image: <code>lora-sweep reproduce IMAGE_ID</code>. The composed config (<a href='config.yaml'>config.yaml</a>):</p>",
        f"<details><summary>config.yaml</summary><pre>{_e(config_text)}</pre></details>",
        "<h2 id='images'>All images</h2>",
        images_table(table, scores),
        f"<script>{SORT_SCRIPT}</script></body></html>",
    ]
    path = root / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path


def search_section(root: Path, table: pd.DataFrame) -> str:
    """A search's answer (search/search.json from runner/search/record.py): the best setting with its images, then how it got there."""
    import json

    path = root / "search" / "search.json"
    if not path.exists():
        return ""
    info = json.loads(path.read_text())
    best = info.get("best")
    parts = ["<h2 id='search'>Search</h2>"]
    grid = info.get("full_grid")
    budget = f"{info['images_generated']} images generated ({info['images_per_trial']} per trial)"
    if grid:
        share = info["images_generated"] / max(1, grid["images"])
        budget += f"; the full grid of this space at its steps: {grid['settings']} settings, {grid['images']} images"
        budget += f" ({share:.0%} of it generated)"
    trials = f"{info['trials_complete']} complete, {info['trials_failed']} failed of {info['trials_planned']} ({_e(info['sampler'])})"
    if info.get("trials_waiting"):
        trials += (
            f"; {info['trials_waiting']} waiting for votes ({info['votes_per_trial']} each): "
            f"<code>lora-sweep compare {_e(str(root))}</code>, then run the search again"
        )
    judged = "each score's mean over the trial's images"
    if info.get("votes_per_trial"):
        judged += "; human: its cells' Bradley-Terry strength from the votes"
    versus = []
    compared = info.get("grid_at_budget")
    if compared and best:
        sign = 1 if info["direction"] == "maximize" else -1
        gain = sign * (best["value"] - compared["best"]["value"])
        verdict = "the search found better" if gain > 1e-9 else "the grid found better" if gain < -1e-9 else "the same setting's value"
        setting = ", ".join(f"{k}={v}" for k, v in compared["best"]["params"].items())
        levels = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in compared["levels"].items())
        versus.append(
            (
                "grid at the same budget",
                f"{compared['settings']} settings ({_e(levels)}): best {compared['best']['value']:.4f} ({_e(setting)}) "
                f"vs the search's {best['value']:.4f}: {verdict}",
            )
        )
    parts.append(
        _facts(
            [
                ("objective", f"{_e(info['direction'])} <code>{_e(info['objective'])}</code> ({judged})"),
                ("trials", trials),
                ("budget", _e(budget)),
                ("space", "<br>".join(_e(s) for s in info["space"])),
                ("seeds", _e(", ".join(map(str, info["seeds"])))),
                *versus,
            ]
        )
    )
    if best:
        files = table.set_index("id")["file"].dropna() if "file" in table else pd.Series(dtype=str)
        thumbs = "".join(
            f"<a href='{_e(files[i])}'><img class='best' src='{_e(files[i])}' alt='{_e(i)}' title='{_e(i)}'></a>"
            for i in best["ids"]
            if i in files
        )
        params = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in best["params"].items())
        means = ", ".join(f"{_e(k)} {v:.3f}" for k, v in best["means"].items() if v == v)
        parts.append(
            f"<h3>Best: trial {best['trial']}, objective {best['value']:.4f}</h3>"
            f"<table class='facts'>{params}</table><p class='muted'>Mean scores: {means}</p><p>{thumbs}</p>"
        )
    importances = info.get("importances") or {}
    if importances:
        parts.append(
            "<h3>Parameter importance</h3><table><tr><th>parameter</th><th>importance (fANOVA)</th></tr>"
            + "".join(f"<tr><td>{_e(k)}</td>{_num(v)}</tr>" for k, v in importances.items())
            + "</table>"
        )
    parts += [f"<p><img class='plot' src='{_e(p)}' alt='{_e(Path(p).stem)}'></p>" for p in info.get("plots", [])]
    parts.append(
        "<p class='muted'>Every trial: <a href='search/trials.csv'>search/trials.csv</a>; the study: study.db (Optuna, sqlite).</p>"
    )
    return "".join(parts)


def _lora_about(info: dict[str, str] | None) -> str:
    """'mine-000004.safetensors: kohya, sd_v1, LoRA rank 4 alpha 1, epoch 4, step 1000, 512x512; trigger <b>sks style</b>'."""
    if not info:
        return ""
    network = info.get("network", "LoRA") + "".join(f" {k} {info[k]}" for k in ("rank", "alpha") if k in info)
    parts = [info.get("tool", "unknown"), *([info["base"]] if "base" in info else []), network]
    parts += [f"{k} {info[k]}" for k in ("epoch", "step") if k in info] + ([info["resolution"]] if "resolution" in info else [])
    trigger = f"; trigger <b class='trigger'>{_e(info['trigger'])}</b>" if info.get("trigger") else "; no trigger"
    return f"<code>{_e(info.get('file', ''))}</code>: {_e(', '.join(parts))}{trigger}"


def images_table(table: pd.DataFrame, scores: list[str]) -> str:
    present = [s for s in scores if s in table]
    head = "".join(f"<th>{_e(c)}</th>" for c in ["id", "blend", "seed", "status", *present])
    rows = []
    for r in table.to_dict("records"):
        link = f"<a href='images/{_e(r['id'])}.png'>{_e(r['id'])}</a>" if r.get("status") == "ok" else _e(r["id"])
        cells = [
            f"<td>{link}</td>",
            f"<td>{_e(r['blend'])}</td>",
            f"<td class='num'>{_e(r['seed'])}</td>",
            f"<td>{_e(r.get('status') or 'pending')}</td>",
        ]
        cells += [_num(r.get(s)) for s in present]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    body = f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f"<details><summary>{len(table)} images</summary>{body}</details>"


def grid_html(path: Path, root: Path) -> str:
    link = _e(path.relative_to(root).as_posix())
    return f"<h3>{_e(path.stem)}</h3><p><a href='{link}'><img class='grid' src='{link}' alt='{_e(path.stem)}'></a></p>"


def failure_row(r: dict) -> str:
    error = (str(r.get("error") or "").strip().splitlines() or [""])[0]
    return f"<tr><td>{_e(r['id'])}</td><td>{_e(r['blend'])}</td><td>{_e(r['seed'])}</td><td class='error'>{_e(error)}</td></tr>"


def votes_section(human: Any, root: Path) -> str:
    """People's votes (runner/report/human.HumanReport): the cells by Bradley-Terry strength with intervals, how well
    each score agrees with them and the voters with each other; without votes, how to cast some."""
    how = f"<code>lora-sweep compare {_e(root.parent.name)}/{_e(root.name)}</code>"
    if human is None or human.ranking.empty:
        return f"<h2 id='votes'>People's votes</h2><p class='muted'>No votes yet: run {how} to compare images two at a time.</p>"
    rows = "".join(
        f"<tr data-human-cell='{_e(r['cell'])}'><td class='num'>{i}</td><td class='cell'>{_e(r['cell'])}</td>"
        f"{_num(r['human'])}{_num(r['human_low'])}{_num(r['human_high'])}<td class='num'>{int(r['human_votes'])}</td>"
        f"{_num(r['human_wins'], 1)}</tr>"
        for i, r in enumerate(human.ranking.to_dict("records"), start=1)
    )
    head = "".join(f"<th>{c}</th>" for c in ["rank", "cell", "human", "human_low", "human_high", "votes", "wins"])
    parts = [
        "<h2 id='votes'>People's votes</h2>",
        f"<p class='muted'>{human.votes} votes between cells, ranked by Bradley-Terry log-strength (mean 0; a difference of 1 "
        "is about 73% of votes won); <code>human_low..human_high</code> is a 95% bootstrap interval over the votes, ties count "
        f"half a win each way. Also the <code>human</code> columns of <a href='ranking.csv'>ranking.csv</a>. More votes: {how}.</p>",
        f"<div class='scroll'><table class='sortable' id='votes-table'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>",
    ]
    if not human.scores.empty:
        parts.append(
            "<h3>Scores against people</h3><table id='agreement-table'><tr><th>score</th><th>Kendall's tau</th><th>95% interval</th>"
            "<th>cells</th></tr>"
            + "".join(
                f"<tr><td>{_e(r['score'])}</td>{_num(r['tau'], 2)}<td class='num'>{_interval(r['tau_low'], r['tau_high'])}</td>"
                f"<td class='num'>{r['cells']}</td></tr>"
                for r in human.scores.to_dict("records")
            )
            + "</table><p class='muted'>Kendall's tau between each score's cell ranking (its mean per cell) and the people's: "
            "1 the same order, 0 unrelated, -1 reversed; the interval resamples the votes.</p>"
        )
    if not human.voters.empty:
        parts.append(
            "<h3>Voters against each other</h3><table id='voters-table'><tr><th>voters</th><th>votes</th><th>cell pairs both voted</th>"
            "<th>same choice</th><th>cells</th><th>Kendall's tau</th></tr>"
            + "".join(
                f"<tr><td>{_e(r['voter_a'])} · {_e(r['voter_b'])}</td><td class='num'>{r['votes_a']} · {r['votes_b']}</td>"
                f"<td class='num'>{r['shared_pairs']}</td>{_num(r['same_choice'], 2)}"
                f"<td class='num'>{r['cells']}</td>{_num(r['tau'], 2)}</tr>"
                for r in human.voters.to_dict("records")
            )
            + "</table><p class='muted'>Same choice: the share of cell pairs both voted on where both leaned the same way; "
            "tau compares each voter's own Bradley-Terry ranking over the cells both voted on.</p>"
        )
    return "".join(parts)


def _interval(low: float, high: float) -> str:
    return "–" if math.isnan(low) else f"{low:.2f} .. {high:.2f}"
