"""Episodes turn by turn, in one HTML file that opens from disk: inline CSS and JS, no CDN, no server.

    python view.py runs/paw                          # every logged step of a run: runs/paw/episodes.html
    python view.py runs/paw --last_steps 1           # its newest logged step only
    python view.py eval_results/result.jsonl         # an evaluation (eval.py; --episode_details, --imagine)
    python view.py runs/grpo runs/paw --compare --output compare.html   # two runs (or two evaluations)

The page: an overview per logged step (success, return, invalid actions); the episodes, filtered by success, task
type, group, step or game; a group's episodes side by side with their returns, advantages and lambda_g; an episode
turn by turn: what the agent was shown, its reply with each token shaded by its entropy, the action and reward, the
next observation with each token shaded by the probability the agent gave it (CMAE's clipped tokens outlined), the
transitions top-alpha selected marked, and with eval.py --imagine the observation the model predicted beside the
real one. Hovering a token shows its exact values. Compare: the same game in two runs or two logged steps, side by
side. Each episode stays gzip-compressed in the page until it is opened (the browser's DecompressionStream), and the
lists render a page of rows at a time, so a thousand episodes of 50 turns open in seconds (bench.py --episode_log).
Bad input (no records, a damaged file, records of another schema version) exits with code 2 and writes nothing.
"""

import argparse
import base64
import gzip
import json
import statistics
import sys
import zlib
from pathlib import Path, PurePath

SCHEMA_VERSION = 1  # of the records episode_log.py (training) and eval.py write, as its docstring describes them
REQUIRED = ("source", "game", "task_type", "won", "task_return", "steps", "invalid_actions", "error",
            "first_observation", "turns")


class BadInput(Exception):
    pass


def record_files(path, last_steps):
    path = Path(path)
    if path.is_dir():
        files = sorted((path / "episodes").glob("step-*.jsonl.gz"))
        if not files:
            raise BadInput(f"{path}: no episode records in {path / 'episodes'} (train_paw.py writes them every "
                           "--episode_log_steps steps; is it the run's --output_dir?)")
        return files[-last_steps:] if last_steps else files
    if path.is_file():
        return [path]
    raise BadInput(f"{path}: no such run folder or file")


def read_records(path, last_steps=None):
    """The records of a run folder (its logged steps) or of one .jsonl / .jsonl.gz file, checked: (record, its JSON
    line) pairs."""
    records = []
    for file in record_files(path, last_steps):
        try:
            with (gzip.open if file.suffix == ".gz" else open)(file, "rt", encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    record = json.loads(line)
                    version = record.get("schema") if isinstance(record, dict) else None
                    if version != SCHEMA_VERSION:
                        raise BadInput(
                            f"{file}, line {number}: " + (f"records of schema version {version}" if version else
                                                          "not an episode record (no schema version: written by an "
                                                          "older train_paw.py or eval.py?)")
                            + f"; this view.py reads version {SCHEMA_VERSION}")
                    missing = [key for key in REQUIRED if key not in record]
                    if missing:
                        raise BadInput(f"{file}, line {number}: a record of schema {SCHEMA_VERSION} without "
                                       f"{', '.join(missing)}")
                    records.append((record, line.rstrip("\n")))
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadInput(f"{file}: damaged or truncated ({type(error).__name__}: {error})") from None
    if not records:
        raise BadInput(f"{path}: no episode records")
    return records


def short_game(game):
    """ALFWorld's game files by their task folder and trial; other games (ids) as they are."""
    path = PurePath(game)
    return "/".join(path.parts[-3:-1]) if path.name.startswith("game.") and len(path.parts) > 2 else game


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summary(record, source, index, position):
    """One row of the episode list (`index` in the page, `position` in its source): what the filters and the overview
    need, without the turns."""
    turns = record["turns"]
    return {
        "id": index, "source": source, "step": record.get("step"), "run": record.get("run"),
        "group": record.get("group"), "episode": record.get("episode", position), "game": record["game"],
        "name": short_game(record["game"]), "task_type": record["task_type"], "won": record["won"],
        "task_return": record["task_return"], "reward": record.get("reward"), "advantage": record.get("advantage"),
        "lambda": record.get("lambda"), "steps": record["steps"], "invalid": record["invalid_actions"],
        "error": record["error"], "overlap": mean([t.get("overlap") for t in turns]),
        "selected": sum(t["selected"] for t in turns) if any("selected" in t for t in turns) else None,
        "wm_loss": mean([t["wm_loss"] for t in turns if t.get("selected")]),
    }


def overview(rows):
    """Per logged step (training) or run (evaluation) of a source: success, return, invalid actions."""
    by_step = {}
    for row in rows:
        by_step.setdefault(row["step"] if row["step"] is not None else row["run"], []).append(row)
    return [{"step": step, "episodes": len(group), "success": mean([float(r["won"]) for r in group]),
             "task_return": mean([r["task_return"] for r in group]), "reward": mean([r["reward"] for r in group]),
             "invalid": sum(r["invalid"] for r in group) / max(sum(r["steps"] for r in group), 1),
             "wm_loss": mean([r["wm_loss"] for r in group]), "overlap": mean([r["overlap"] for r in group])}
            for step, group in sorted(by_step.items())]


def page(sources, compare=False):
    """The HTML: the list and overview as JSON, each episode's record gzip-compressed (base64), one per line."""
    rows, blobs, described = [], [], []
    for number, (label, kind, records) in enumerate(sources):
        first = len(rows)
        for record, line in records:
            rows.append(summary(record, number, len(rows), len(rows) - first))
            blobs.append(base64.b64encode(gzip.compress(line.encode(), 6)).decode())
        described.append({"label": label, "kind": kind, "settings": records[0][0].get("settings"),
                          "overview": overview(rows[first:])})
    data = json.dumps({"sources": described, "episodes": rows, "compare": compare}).replace("<", "\\u003c")
    head, rest = TEMPLATE.split("/*DATA*/")
    middle, tail = rest.split("/*BLOBS*/")
    return "".join([head, data, middle, "\n".join(blobs), tail])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="a run folder (its episodes/ records) or an eval.py OUTPUT.jsonl")
    parser.add_argument("--compare", action="store_true", help="two sources, opened on the same games side by side")
    parser.add_argument("--last_steps", type=int, help="a run folder: only its newest N logged steps")
    parser.add_argument("--output", help="the HTML file (default: RUN/episodes.html, or OUTPUT.html beside the .jsonl)")
    args = parser.parse_args(argv)
    if len(args.sources) != (2 if args.compare else 1):
        parser.error("one source, or two with --compare")
    if args.last_steps is not None and args.last_steps < 1:
        parser.error("--last_steps must be >= 1")
    return args


def default_output(source):
    path = Path(source)
    return path / "episodes.html" if path.is_dir() else path.with_name(path.name.split(".")[0] + ".html")


def main(argv=None):
    args = parse_args(argv)
    try:
        sources = []
        for source in args.sources:
            records = read_records(source, args.last_steps)
            label = Path(source).name if Path(source).is_dir() else Path(source).name.split(".")[0]
            if any(label == other for other, _, _ in sources):
                label = str(source)
            sources.append((label, records[0][0]["source"], records))
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    output = Path(args.output) if args.output else default_output(args.sources[0])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page(sources, args.compare), encoding="utf-8")
    print(f"{output}: {sum(len(r) for _, _, r in sources)} episodes; open it in a browser")
    return output


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def headless_chromium(width=1400, height=1000):
    """Debian's Chromium driven by Selenium, for the browser test and bench.py --episode_log (apt-get install chromium
    chromium-driver). It keeps the page's console messages: driver.get_log("browser")."""
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.TemporaryDirectory()  # a fresh profile, removed with the driver
    for flag in [*BROWSER_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile.name}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.profile = profile
    return driver


TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>PaW episodes</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:8px 16px}header b{font-size:16px}
nav{padding:6px 16px;background:#eceff1;position:sticky;top:0;z-index:2}
nav button{margin-right:6px}button{cursor:pointer}
section{padding:10px 16px}.hidden{display:none}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td.l,th.l{text-align:left}tbody tr.ep:hover{background:#e3f2fd;cursor:pointer}
.won{color:#2e7d32;font-weight:bold}.lost{color:#c62828}
.filters label{margin-right:12px}
.turn{background:#fff;border:1px solid #ddd;border-left:5px solid #ddd;margin:8px 0;padding:6px 10px}
.turn.selected{border-left-color:#7b1fa2}
.badge{display:inline-block;border-radius:3px;padding:0 5px;margin-right:6px;font-size:12px;background:#eee}
.badge.sel{background:#7b1fa2;color:#fff}.badge.ok{background:#c8e6c9}.badge.bad{background:#ffcdd2}
.toks{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;border:1px solid #eee;padding:4px}
.tok{border-radius:2px}.tok.clip{outline:1px dashed #c62828}
.obs{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;color:#37474f}
.cols{display:flex;gap:12px;align-items:flex-start}.cols>div{flex:1;min-width:0}
.small{font-size:12px;color:#555}
#tip{position:fixed;pointer-events:none;background:#263238;color:#fff;padding:4px 8px;border-radius:4px;
font:12px ui-monospace,monospace;z-index:9;white-space:pre}
</style></head><body>
<header><b>PaW episodes</b> <span id="title"></span></header>
<nav><button data-view="overview">Overview</button><button data-view="episodes">Episodes</button>
<button data-view="compare">Compare</button> <span id="where" class="small"></span></nav>
<section id="overview"></section>
<section id="episodes" class="hidden"><div class="filters">
<label>source <select id="f-source"></select></label><label>step <select id="f-step"></select></label>
<label>success <select id="f-won"><option value="">all</option><option value="won">won</option>
<option value="lost">lost</option></select></label><label>task type <select id="f-type"></select></label>
<label>group <input id="f-group" size="4"></label><label>game <input id="f-game" size="20"></label>
<span id="count" class="small"></span></div>
<table><thead><tr><th>source</th><th>step</th><th>group</th><th>#</th><th class="l">game</th><th class="l">type</th>
<th>won</th><th>return</th><th>reward</th><th>advantage</th><th>&lambda;</th><th>steps</th><th>invalid</th>
<th>WM selected</th><th>overlap</th></tr></thead><tbody id="rows"></tbody></table>
<button id="more" class="hidden">show more</button></section>
<section id="group" class="hidden"></section>
<section id="episode" class="hidden"></section>
<section id="compare" class="hidden"></section>
<div id="tip" class="hidden"></div>
<script id="paw-data" type="application/json">/*DATA*/</script>
<script id="paw-blobs" type="text/plain">/*BLOBS*/</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("paw-data").textContent);
const EPS = DATA.episodes, SRC = DATA.sources, PAGE = 200;
let blobs = null, shown = [], cache = new Map();
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const num = v => v === null || v === undefined ? "–" : Number.isInteger(v) ? String(v) : v.toFixed(3);
const pct = v => v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %";
const stepOf = e => e.step !== null ? e.step : e.run;
const stepName = s => SRC[s].kind === "train" ? "step" : "run";

async function record(id) {  // an episode's record, decompressed on first use
  if (cache.has(id)) return cache.get(id);
  if (blobs === null) blobs = document.getElementById("paw-blobs").textContent.split("\n");
  const bytes = Uint8Array.from(atob(blobs[id]), c => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const value = JSON.parse(await new Response(stream).text());
  cache.set(id, value);
  return value;
}

function show(view, where) {
  for (const v of ["overview", "episodes", "group", "episode", "compare"]) $(v).classList.toggle("hidden", v !== view);
  $("where").textContent = where || "";
  window.scrollTo(0, 0);
}

function drawOverview() {
  let html = "";
  SRC.forEach((s, i) => {
    const settings = s.settings ? Object.entries(s.settings).map(([k, v]) => k + " " + v).join(", ") : "";
    html += `<h3>${esc(s.label)} <span class="small">(${s.kind}) ${esc(settings)}</span></h3><table><tr>` +
      `<th>${s.kind === "train" ? "step" : "run"}</th><th>episodes</th><th>success</th><th>return</th>` +
      `<th>reward</th><th>invalid actions</th><th>WM loss (selected)</th><th>imagined overlap</th></tr>`;
    for (const o of s.overview) html += `<tr class="ep" data-source="${i}" data-step="${o.step}"><td>${o.step}</td>` +
      `<td>${o.episodes}</td><td>${pct(o.success)}</td><td>${num(o.task_return)}</td><td>${num(o.reward)}</td>` +
      `<td>${pct(o.invalid)}</td><td>${num(o.wm_loss)}</td><td>${num(o.overlap)}</td></tr>`;
    html += "</table>";
  });
  $("overview").innerHTML = html + '<p class="small">Click a row for its episodes.</p>';
  for (const tr of $("overview").querySelectorAll("tr.ep")) tr.onclick = () => {
    $("f-source").value = tr.dataset.source; fillSteps(); $("f-step").value = tr.dataset.step; filter();
    show("episodes");
  };
}

function options(select, values, all) {
  select.innerHTML = (all ? '<option value="">all</option>' : "") +
    values.map(([v, label]) => `<option value="${esc(v)}">${esc(label)}</option>`).join("");
}

function fillSteps() {
  const source = $("f-source").value;
  const steps = [...new Set(EPS.filter(e => source === "" || e.source == source).map(stepOf))].sort((a, b) => a - b);
  options($("f-step"), steps.map(s => [s, s]), true);
}

function filter() {
  const source = $("f-source").value, step = $("f-step").value, won = $("f-won").value;
  const type = $("f-type").value, group = $("f-group").value.trim(), game = $("f-game").value.trim().toLowerCase();
  shown = EPS.filter(e => (source === "" || e.source == source) && (step === "" || stepOf(e) == step) &&
    (won === "" || e.won === (won === "won")) && (type === "" || e.task_type === type) &&
    (group === "" || e.group == group) && (game === "" || e.game.toLowerCase().includes(game)));
  $("rows").innerHTML = "";
  $("count").textContent = `${shown.length} of ${EPS.length} episodes`;
  more();
}

function more() {  // the next page of rows: the DOM never holds more than the user scrolled to
  const start = $("rows").children.length;
  $("rows").insertAdjacentHTML("beforeend", shown.slice(start, start + PAGE).map(e =>
    `<tr class="ep" data-id="${e.id}"><td>${esc(SRC[e.source].label)}</td><td>${stepOf(e)}</td>` +
    `<td>${e.group === null ? "–" : `<a href="#" data-group="${e.id}">${e.group}</a>`}</td><td>${e.episode}</td>` +
    `<td class="l">${esc(e.name)}</td><td class="l">${esc(e.task_type)}</td>` +
    `<td class="${e.won ? "won" : "lost"}">${e.won ? "won" : "lost"}</td><td>${num(e.task_return)}</td>` +
    `<td>${num(e.reward)}</td><td>${num(e.advantage)}</td><td>${num(e.lambda)}</td><td>${e.steps}</td>` +
    `<td>${e.invalid}</td><td>${num(e.selected)}</td><td>${num(e.overlap)}</td></tr>`).join(""));
  $("more").classList.toggle("hidden", $("rows").children.length >= shown.length);
}

function tokens(list, kind, turn, scale) {  // token spans: data-* index into the turn's value lists
  return list.map((text, j) => {
    let shade;
    if (kind === "reply") shade = `rgba(255,140,0,${(0.85 * turn.reply_entropy[j] / scale).toFixed(3)})`;
    else shade = `rgba(46,160,67,${(0.85 * Math.exp(turn.obs_logp[j])).toFixed(3)})`;
    const clip = kind === "obs" && turn.obs_clipped && turn.obs_clipped[j] ? " clip" : "";
    return `<span class="tok${clip}" data-kind="${kind}" data-j="${j}" style="background:${shade}">${esc(text)}</span>`;
  }).join("");
}

function turnHtml(r, t, i, scale) {
  const badges = [`<span class="badge ${t.valid ? "ok" : "bad"}">${t.valid ? "valid" : "invalid"}</span>`];
  if (t.selected) badges.push(`<span class="badge sel">WM selected: L_WM ${num(t.wm_loss)}</span>`);
  else if ("selected" in t) {
    badges.push(`<span class="badge">not selected${t.wm_loss === null ? " (no target)" : ""}</span>`);
  }
  if (t.cut) badges.push('<span class="badge bad">cut by the token budget</span>');
  const seen = i === 0 ? r.first_observation : r.turns[i - 1].observation;
  let html = `<div class="turn${t.selected ? " selected" : ""}" data-turn="${i}"><div><b>turn ${i + 1}</b> ` +
    badges.join("") + `<span class="small">reward ${num(t.reward)} · advantage ${num(t.advantage)} · ` +
    `action entropy ${num(t.entropy)}` +
    `${"anchor" in t ? ` · state ${t.anchor} (${t.anchor_size} steps of the group)` : ""}` +
    `</span></div><div class="small">shown:</div><div class="obs">${esc(seen === null ? "" : seen)}</div>`;
  if (t.admissible) html += `<details><summary class="small">${t.admissible.length} admissible actions</summary>` +
    `<div class="small">${esc(t.admissible.join(", "))}</div></details>`;
  html += '<div class="small">reply (shaded by entropy), action ' +
    `<b>${esc(t.action === null ? "none" : t.action)}</b>:</div>`;
  html += `<div class="toks">${t.reply_tokens ? tokens(t.reply_tokens, "reply", t, scale) : esc(t.reply || "")}</div>`;
  const real = t.obs_tokens && t.obs_tokens.length ? tokens(t.obs_tokens, "obs", t, scale) :
    esc(t.observation === null ? "(no observation)" : t.observation);
  html += `<div class="small">next observation (shaded by the agent's probability; dashed: clipped by CMAE):</div>`;
  if ("imagined" in t) html += '<div class="cols"><div><div class="small">real</div>' +
    `<div class="toks">${real}</div></div>` +
    `<div><div class="small">imagined by the model (token overlap ${num(t.overlap)})</div>` +
    `<div class="toks imagined">${esc(t.imagined)}</div></div></div>`;
  else html += `<div class="toks">${real}</div>`;
  return html + "</div>";
}

function episodeHtml(e, r) {
  const scale = Math.max(1e-9, ...r.turns.flatMap(t => t.reply_entropy || []));
  const head = `<h3>${esc(SRC[e.source].label)}, ${stepName(e.source)} ${stepOf(e)}, episode ${e.episode}` +
    `${e.group === null ? "" : ", group " + e.group}: ` +
    `<span class="${r.won ? "won" : "lost"}">${r.won ? "won" : "lost"}` +
    `</span></h3><p class="small">${esc(r.game)} (${esc(r.task_type)})<br>return ${num(r.task_return)} · reward ` +
    `${num(r.reward)} · advantage ${num(r.advantage)} · group return ${num(r.group_return)} · &lambda; ` +
    `${num(r["lambda"])} · ${r.steps} steps, ${r.invalid_actions} invalid${r.truncated ? " · truncated" : ""}` +
    `${r.error ? " · error: " + esc(r.error) : ""}` +
    `${"micro_batch" in r ? " · micro-batch " + r.micro_batch : ""}<br>` +
    `reply tokens: orange by entropy (darkest: ${num(scale)} nats, this episode's highest); observation tokens: ` +
    "green by the probability the agent gave them (darkest: 1); hover a token for its values</p>";
  const turns = r.turns.map((t, i) => turnHtml(r, t, i, scale)).join("");
  return `<div class="episode" data-id="${e.id}">${head}${turns}</div>`;
}

async function openEpisode(id) {
  const e = EPS[id], r = await record(id);
  $("episode").innerHTML = '<button class="back">back to the list</button>' + episodeHtml(e, r);
  $("episode").querySelector(".back").onclick = () => show("episodes");
  show("episode", `${SRC[e.source].label} · ${e.name}`);
}

async function openGroup(id) {
  const e = EPS[id];
  const members = EPS.filter(x => x.source === e.source && x.step === e.step && x.group === e.group);
  const records = await Promise.all(members.map(x => record(x.id)));
  let html = `<button class="back">back to the list</button><h3>${esc(SRC[e.source].label)}, step ${e.step}, ` +
    `group ${e.group}: ${esc(e.name)}</h3><p class="small">Group return ${num(records[0].group_return)}, ` +
    `&lambda;<sub>g</sub> ${num(records[0]["lambda"])}: the WM weight of every transition of the group.</p>` +
    '<div class="cols">';
  members.forEach((x, k) => {
    const r = records[k];
    html += `<div><p><a href="#" data-open="${x.id}">episode ${x.episode}</a> ` +
    `<span class="${r.won ? "won" : "lost"}">` +
      `${r.won ? "won" : "lost"}</span><br>return ${num(r.task_return)} · reward ${num(r.reward)} · advantage ` +
      `${num(r.advantage)}</p><table><tr><th>turn</th><th class="l">action</th><th>adv.</th><th>WM</th></tr>` +
      r.turns.map((t, i) => `<tr><td>${i + 1}</td><td class="l ${t.valid ? "" : "lost"}">${esc(t.action || "(none)")}` +
        `</td><td>${num(t.advantage)}</td><td>${t.selected ? num(t.wm_loss) : "–"}</td></tr>`).join("") +
      "</table></div>";
  });
  $("group").innerHTML = html + "</div>";
  $("group").querySelector(".back").onclick = () => show("episodes");
  for (const a of $("group").querySelectorAll("a[data-open]")) {
    a.onclick = ev => { ev.preventDefault(); openEpisode(+a.dataset.open); };
  }
  show("group", `group ${e.group}`);
}

function compareSide(k) {
  const choices = [];
  SRC.forEach((s, i) => s.overview.forEach(o => choices.push([i + ":" + o.step,
                                                             `${s.label}, ${stepName(i)} ${o.step}`])));
  return `<label>${k === 0 ? "left" : "right"} <select id="c-${k}">` +
    choices.map(([v, l]) => `<option value="${esc(v)}">${esc(l)}</option>`).join("") + "</select></label> ";
}

function drawCompare() {
  $("compare").innerHTML = compareSide(0) + compareSide(1) + '<div id="c-games"></div><div class="cols">' +
    '<div id="c-left"></div><div id="c-right"></div></div>';
  const last = $("c-1").options.length - 1;
  $("c-1").selectedIndex = SRC.length > 1 ? [...$("c-1").options].findIndex(o => o.value.startsWith("1:")) : last;
  $("c-0").onchange = $("c-1").onchange = compareGames;
  compareGames();
}

function side(k) {
  const [source, step] = $("c-" + k).value.split(":");
  return EPS.filter(e => e.source == source && stepOf(e) == step);
}

function compareGames() {
  const left = side(0), right = side(1);
  const games = [...new Set(left.map(e => e.game))].filter(g => right.some(e => e.game === g));
  const rate = (list, g) => {
    const played = list.filter(e => e.game === g);
    return `${played.filter(e => e.won).length}/${played.length}`;
  };
  $("c-games").innerHTML = `<p class="small">${games.length} games played on both sides (won / played)` +
    (games.length ? ":" : ": compare evaluations of the same games, or the steps of a run on few games " +
     "(--num_train_games)") + "</p><table>" +
    games.map(g => `<tr class="ep" data-game="${esc(g)}"><td class="l">${esc(left.find(e => e.game === g).name)}</td>` +
      `<td>${rate(left, g)}</td><td>${rate(right, g)}</td></tr>`).join("") + "</table>";
  for (const tr of $("c-games").querySelectorAll("tr.ep")) tr.onclick = () => compareGame(tr.dataset.game);
}

async function compareGame(game) {
  for (const k of [0, 1]) {
    const list = side(k).filter(e => e.game === game), pane = $(k === 0 ? "c-left" : "c-right");
    const pick = "<select>" + list.map(e =>
      `<option value="${e.id}">episode ${e.episode} (${e.won ? "won" : "lost"})</option>`).join("") + "</select>";
    pane.innerHTML = pick + '<div class="pane"></div>';
    const draw = async () => { const id = +pane.querySelector("select").value;
      pane.querySelector(".pane").innerHTML = episodeHtml(EPS[id], await record(id)); };
    pane.querySelector("select").onchange = draw;
    await draw();
  }
}

function tip(ev) {  // a token's exact values, read from its record
  const span = ev.target.closest ? ev.target.closest(".tok") : null;
  if (!span) { $("tip").classList.add("hidden"); return; }
  const box = span.closest(".episode"), turn = span.closest(".turn"), j = +span.dataset.j;
  const t = cache.get(+box.dataset.id).turns[+turn.dataset.turn];
  const rows = [["token", JSON.stringify(span.textContent)]];
  if (span.dataset.kind === "reply") {
    rows.push(["logp", t.reply_logp[j]], ["p", Math.exp(t.reply_logp[j]).toPrecision(4)],
              ["entropy", t.reply_entropy[j]]);
    if (t.advantage !== undefined) rows.push(["advantage", t.advantage]);
  } else {
    rows.push(["logp", t.obs_logp[j]], ["p", Math.exp(t.obs_logp[j]).toPrecision(4)]);
    if (t.obs_clipped) rows.push(["clipped", t.obs_clipped[j] ? "yes (p > rho: no WM loss)" : "no"]);
  }
  $("tip").innerHTML = rows.map(([k, v]) => `${k}: <span data-k="${k}">${esc(v)}</span>`).join("\n");
  $("tip").style.left = (ev.clientX + 12) + "px";
  $("tip").style.top = (ev.clientY + 12) + "px";
  $("tip").classList.remove("hidden");
}

document.addEventListener("mouseover", tip);
for (const b of document.querySelectorAll("nav button")) b.onclick = () => show(b.dataset.view);
$("title").textContent = SRC.map(s => s.label).join(" vs ") + ` · ${EPS.length} episodes`;
options($("f-source"), SRC.map((s, i) => [i, s.label]), true);
options($("f-type"), [...new Set(EPS.map(e => e.task_type))].sort().map(t => [t, t]), true);
fillSteps();
$("f-source").onchange = () => { fillSteps(); filter(); };
for (const id of ["f-step", "f-won", "f-type"]) $(id).onchange = filter;
for (const id of ["f-group", "f-game"]) $(id).oninput = filter;
$("more").onclick = more;
$("rows").onclick = ev => {
  const link = ev.target.closest("a[data-group]");
  if (link) { ev.preventDefault(); openGroup(+link.dataset.group); return; }
  const tr = ev.target.closest("tr.ep");
  if (tr) openEpisode(+tr.dataset.id);
};
drawOverview();
filter();
drawCompare();
show(DATA.compare ? "compare" : "overview");
</script></body></html>
"""

if __name__ == "__main__":
    main()
