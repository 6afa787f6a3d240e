"""The quickstart's report: one self-contained HTML page (images and videos inlined, no network, CSS inline).

Every number on the page is read from the results dict passed in (the quickstart's results.json), and every
cell that shows one carries `data-key="dotted.path"` so that a reader (or a test) can check it against the
file. Assets (videos, PNGs) are read from paths relative to the results' folder and embedded as data URIs.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

from physis.eval.trace import segments

# Colours for subtask labels, assigned in order of first appearance (colour-blind friendly where possible).
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")

CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#e3e6ec; --bg:#f6f7f9; --card:#fff; --accent:#3b7dd8;
        --good:#2e9d57; --bad:#c8553d; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:linear-gradient(135deg,#1d2b4a,#2f5d9b); color:#fff; padding:40px 0 32px; }
.wrap { max-width:1120px; margin:0 auto; padding:0 28px; }
.eyebrow { text-transform:uppercase; letter-spacing:.12em; font-size:12px; opacity:.75; }
h1 { font-size:30px; line-height:1.2; margin:6px 0 10px; font-weight:650; }
.lede { max-width:760px; opacity:.9; margin:0 0 22px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(190px,1fr)); gap:12px; }
.card { background:rgba(255,255,255,.1); border:1px solid rgba(255,255,255,.18); border-radius:10px;
        padding:12px 14px; }
.card .v { font-size:26px; font-weight:650; }
.card .k { font-size:12.5px; opacity:.85; }
.meta { margin-top:16px; font-size:12.5px; opacity:.75; }
section { background:var(--card); border:1px solid var(--line); border-radius:12px; padding:22px 26px;
          margin:22px 0; }
h2 { font-size:20px; margin:0 0 4px; }
.sub { color:var(--muted); margin:0 0 16px; max-width:860px; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { text-align:left; padding:7px 10px; border-bottom:1px solid var(--line); vertical-align:middle; }
th { font-size:12px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted); font-weight:600; }
td.num { text-align:right; white-space:nowrap; }
tr.total td { font-weight:650; border-top:2px solid var(--ink); }
.track { position:relative; height:14px; background:#edf0f4; border-radius:7px; min-width:180px; }
.fill { position:absolute; left:0; top:0; bottom:0; background:var(--accent); border-radius:7px; }
.ci { position:absolute; top:5px; height:4px; border-left:2px solid var(--ink); border-right:2px solid var(--ink);
      background:rgba(29,35,48,.45); }
.videos { display:grid; grid-template-columns:repeat(auto-fill,minmax(330px,1fr)); gap:16px; }
figure { margin:0; }
video, .shot { width:100%; border-radius:8px; background:#fff; display:block; image-rendering:pixelated; }
.plot { width:100%; display:block; }
figcaption { font-size:13px; color:var(--muted); margin-top:6px; }
.ok { color:var(--good); font-weight:600; } .fail { color:var(--bad); font-weight:600; }
.timeline { display:grid; grid-template-columns:120px 1fr; gap:6px 12px; align-items:center; margin:8px 0 6px; }
.lane { display:flex; height:26px; border-radius:6px; overflow:hidden; background:#edf0f4; }
.lane div { height:100%; }
.axis { display:flex; justify-content:space-between; font-size:11px; color:var(--muted); }
.legend { display:flex; flex-wrap:wrap; gap:6px 16px; font-size:13px; margin:10px 0 16px; }
.chip { display:inline-block; width:11px; height:11px; border-radius:3px; margin-right:6px; vertical-align:-1px; }
.two { display:grid; grid-template-columns:minmax(0,1.35fr) minmax(0,1fr); gap:24px; align-items:start; }
@media (max-width:860px) { .two { grid-template-columns:1fr; } }
pre { background:#111827; color:#e5e7eb; padding:16px 18px; border-radius:10px; overflow-x:auto;
      font:12.5px/1.6 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
code { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:.92em; }
.note { font-size:13px; color:var(--muted); }
footer { color:var(--muted); font-size:12.5px; padding:8px 0 40px; }
"""


def write_html_report(results: dict[str, Any], root: Path, path: Path) -> Path:
    """Render `results` (assets read relative to `root`) into `path`, atomically."""
    page = render(results, Path(root))
    tmp = path.with_suffix(".tmp.html")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def render(results: dict[str, Any], root: Path) -> str:
    qs = results["quickstart"]
    title = f"physis quickstart: {results['suite']}"
    body = "\n".join([
        _header(results),
        '<main class="wrap">',
        _success(results),
        _videos(results, root),
        _trace(results),
        _world_model(results, root),
        _training(results, root),
        _heads(results),
        _reproduce(results),
        "</main>",
        f'<footer class="wrap">Made by <code>physis quickstart</code> on {_e(qs["date"])}. Every number on '
        f'this page is read from <code>results.json</code> beside it.</footer>',
    ])
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------------------------------------------- sections


def _header(r: dict[str, Any]) -> str:
    t, h, qs = r["training"], r.get("heads", {}), r["quickstart"]
    n = len(r["tasks"])
    lo, hi = r["mean_success_ci95"]
    cards = [_card(_pct(r["mean_success"], 1), "mean success on held-out seeds", "mean_success",
                   r["mean_success"], f"95% interval {_pct(lo)}–{_pct(hi)}, {r['total_episodes']} episodes")]
    if "subtask_accuracy" in h:
        cards.append(_card(_pct(h["subtask_accuracy"], 1), "subtask said right (held-out demos)",
                           "heads.subtask_accuracy", h["subtask_accuracy"]))
    if "progress_pearson" in h:
        cards.append(_card(f"{h['progress_pearson']:.3f}", "progress estimate vs truth (Pearson r)",
                           "heads.progress_pearson", h["progress_pearson"]))
    if "world_model_latent_mse" in h:
        gain = 1 - h["world_model_latent_mse"] / max(h["copy_baseline_latent_mse"], 1e-12)
        shown = f"−{gain:.0%}" if gain > 0 else f"+{-gain:.0%}" if gain > -1 else f"{1 - gain:.1f}×"
        cards.append(_card(shown, "world-model error vs 'nothing changes'",
                           note="latent error of the predicted future frame; lower is better"))
    cards.append(_card(f"{t['steps']:,}", f"training steps in {t['seconds'] / 60:.1f} min",
                       "training.steps", t["steps"], f"{t['samples_per_s']:.0f} samples/s on {t['device']}"))
    budget = f"{t['budget_minutes']:g} minutes" if t["budget_minutes"] else f"{t['target_steps']} steps"
    spent = sum(s["seconds"] for s in qs["stages"].values())
    return f"""<header><div class="wrap">
<div class="eyebrow">physis quickstart report</div>
<h1>physis-{_e(t['preset'])}, trained for {budget} on {_n(n, _e(r['suite']) + ' task')}</h1>
<p class="lede">One model reads two camera images, the robot's state and an instruction; from one trunk it
acts (flow-matching action chunks), says which subtask it is on, estimates its progress and predicts the
frame it will see next. Success is measured on evaluation seeds no demonstration came from.</p>
<div class="cards">{''.join(cards)}</div>
<div class="meta">{_e(qs['date'])} · {_e(qs['machine'])} · {spent / 60:.1f} min of work in all stages</div>
</div></header>"""


def _success(r: dict[str, Any]) -> str:
    expert = r.get("data", {}).get("expert", {})
    rows = []
    for name, t in r["tasks"].items():
        key = f"tasks.{name}"
        lo, hi = t["ci95"]
        e = expert.get(name)
        length = f"{t['mean_length']:.0f}"
        rows.append(
            f"<tr><td><code>{_e(name)}</code></td>"
            f'<td class="num">{_v(f"{key}.successes", t["successes"])}/{_v(f"{key}.episodes", t["episodes"])}</td>'
            f'<td class="num">{_v(f"{key}.success_rate", t["success_rate"], _pct(t["success_rate"]))}</td>'
            f'<td>{_bar(t["success_rate"], lo, hi)}</td>'
            f'<td class="num" data-key="{key}.ci95">{_pct(lo)}–{_pct(hi)}</td>'
            f'<td class="num">{_v(f"{key}.mean_length", t["mean_length"], length)}</td>'
            f'<td class="num">{_pct(e["success_rate"]) if e else "–"}</td></tr>')
    lo, hi = r["mean_success_ci95"]
    successes = sum(t["successes"] for t in r["tasks"].values())
    rows.append(f'<tr class="total"><td>mean over tasks</td><td class="num">{successes}/{r["total_episodes"]}</td>'
                f'<td class="num">{_v("mean_success", r["mean_success"], _pct(r["mean_success"], 1))}</td>'
                f'<td>{_bar(r["mean_success"], lo, hi)}</td>'
                f'<td class="num" data-key="mean_success_ci95">{_pct(lo)}–{_pct(hi)}</td><td></td><td></td></tr>')
    replan = r.get("replan_every") or 0
    loop = f"re-planning after {replan} steps of each chunk" if replan else "each chunk run to its end (open loop)"
    return f"""<section id="success"><h2>Success on held-out seeds</h2>
<p class="sub">{_n(r['episodes_per_task'], 'episode')} per task from evaluation seeds {r['seed']:,} onward, {loop}.
Bars show the success rate with its 95% Wilson interval; the last column is the scripted expert's success
while collecting the demonstrations, the ceiling for imitation.</p>
<table><tr><th>task</th><th class="num">success</th><th class="num">rate</th><th></th><th class="num">95% interval</th>
<th class="num">mean steps</th><th class="num">expert (demos)</th></tr>
{''.join(rows)}</table></section>"""


def _videos(r: dict[str, Any], root: Path) -> str:
    figures = []
    for name, t in r["tasks"].items():
        for video in t.get("videos", []):
            path = root / video
            if not path.is_file():
                continue
            seed = _seed_of(video)
            caption = f"<code>{_e(name)}</code> · seed {seed:,}" if seed is not None else f"<code>{_e(name)}</code>"
            if seed is not None and seed in t["seeds"] and "episode_success" in t:
                i = t["seeds"].index(seed)
                ok, steps = t["episode_success"][i], t["episode_length"][i]
                distance = (t.get("episode_goal_distance") or [None] * len(t["seeds"]))[i]
                left = f", {distance:.2f} m from the goal" if distance is not None else ""
                caption += (f' · <span class="ok">success in {steps} steps</span>' if ok
                            else f' · <span class="fail">failed ({steps} steps{left})</span>')
            poster = _poster(path)
            poster = f' poster="{poster}"' if poster else ""
            figures.append(f'<figure><video controls autoplay muted loop playsinline preload="auto"{poster}>'
                           f'<source src="{_data_uri(path, "video/mp4")}" type="video/mp4"></video>'
                           f"<figcaption>{caption}</figcaption></figure>")
    if not figures:
        return ""
    return f"""<section id="videos"><h2>Rollouts</h2>
<p class="sub">The model in control on held-out seeds, its cameras side by side. Videos loop.</p>
<div class="videos">{''.join(figures)}</div></section>"""


def _trace(r: dict[str, Any]) -> str:
    tr = r.get("subtask_trace")
    if not tr or not tr.get("steps"):
        return ""
    colours: dict[str, str] = {}
    for label in [*tr["expert"], *tr["model"]]:
        colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)] if label else "#d0d4db")
    steps = tr["steps"]

    def lane(labels: list[str]) -> str:
        return "".join(f'<div style="width:{100 * (b - a) / steps:.3f}%;background:{colours[lab]}" '
                       f'title="steps {a}–{b - 1}: {_e(lab or "(nothing)")}"></div>' for a, b, lab in segments(labels))

    legend = "".join(f'<span><span class="chip" style="background:{c}"></span>{_e(lab or "(nothing)")}</span>'
                     for lab, c in colours.items())
    rows = []
    for a, b, label in segments(tr["expert"]):
        said = tr["model"][a:b]
        top = max(set(said), key=said.count)
        agree = sum(s == label for s in said) / len(said)
        rows.append(f'<tr><td class="num">{a}–{b - 1}</td><td><span class="chip" style="background:{colours[label]}">'
                    f'</span>{_e(label)}</td><td><span class="chip" style="background:{colours[top]}"></span>'
                    f'{_e(top or "(nothing)")}</td><td class="num">{_pct(agree)}</td></tr>')
    outcome = "succeeds" if tr["expert_success"] else "does not finish"
    return f"""<section id="trace"><h2>What the model says it is doing</h2>
<p class="sub">The scripted expert drives one episode of <code>{_e(tr['task'])}</code> (seed {tr['seed']:,}, the
same scene as its video above; the expert {outcome} in {steps} steps). At every step the model sees the
same observation and generates its subtask before acting. Instruction: “{_e(tr['instruction'])}”.</p>
<div class="timeline"><div>expert's label</div><div class="lane">{lane(tr['expert'])}</div>
<div>model says</div><div class="lane">{lane(tr['model'])}</div>
<div></div><div class="axis"><span>step 0</span><span>step {steps - 1}</span></div></div>
<div class="legend">{legend}</div>
<p>The model's subtask equals the expert's at
<b>{_v("subtask_trace.agreement", tr["agreement"], _pct(tr["agreement"]))}</b> of the steps
({_v("subtask_trace.agreeing_steps", tr["agreeing_steps"])} of {_v("subtask_trace.steps", steps)}).</p>
<table><tr><th class="num">steps</th><th>expert's label</th><th>what the model said most</th>
<th class="num">agreement</th></tr>{''.join(rows)}</table></section>"""


def _world_model(r: dict[str, Any], root: Path) -> str:
    h = r.get("heads", {})
    png = h.get("world_model_png")
    if not png or not (root / png).is_file():
        return ""
    wm, copy = h["world_model_latent_mse"], h["copy_baseline_latent_mse"]
    gain = 1 - wm / max(copy, 1e-12)
    verdict = f"{gain:.0%} lower than" if gain > 0 else f"{-gain:.0%} higher than"
    horizon = r["quickstart"]["config"].get("horizon", "")
    return f"""<section id="world-model"><h2>What the model expects to see</h2>
<img class="shot" src="{_strip_uri(root / png)}" alt="world model samples">
<div class="two" style="margin-top:16px"><p class="sub">Each row is a held-out demonstration frame:
<b>now</b>, the <b>real future</b> {horizon} steps later, and a <b>predicted future</b> the model sampled
for the demonstrated actions, decoded from its small latent by the frame decoder (so blurry by design: the
latent is what the model plans with).</p>
<div><table><tr><th>latent error of the future frame</th><th class="num">mean squared</th></tr>
<tr><td>world model's prediction</td><td class="num">{_v("heads.world_model_latent_mse", wm, f"{wm:.3f}")}</td></tr>
<tr><td>baseline: nothing changes (the current frame)</td>
<td class="num">{_v("heads.copy_baseline_latent_mse", copy, f"{copy:.3f}")}</td></tr></table>
<p class="note">The prediction's error is {verdict} the baseline's.</p></div></div></section>"""


def _training(r: dict[str, Any], root: Path) -> str:
    t = r["training"]
    img = ""
    if t.get("curves") and (root / t["curves"]).is_file():
        img = f'<img class="plot" src="{_data_uri(root / t["curves"], "image/png")}" alt="training curves">'
    names = {"loss": "total", "world_model": "world model", "recon": "frame decoder"}
    heads_row = "".join(f'<th class="num">{_e(names.get(k, k))}</th>' for k in t["final_losses"])
    losses = "".join(f'<td class="num">{_v(f"training.final_losses.{k}", v, f"{v:.4f}")}</td>'
                     for k, v in t["final_losses"].items())
    return f"""<section id="training"><h2>Training</h2>
<p class="sub"><code>{_e(t['preset'])}</code> ({t['params_total']:,} parameters), batch {t['batch_size']},
{_v("training.steps", t["steps"], f"{t['steps']:,}")} of {t['target_steps']:,} scheduled steps in
{t['seconds'] / 60:.1f} min on {_e(t['device'])} ({t['samples_per_s']:.0f} samples/s in the last session,
peak memory {t['peak_rss_mb']:.0f} MB), on {_n(r['data']['episodes'], 'demonstration')}
({r['data']['frames']:,} frames).</p>
{img}
<table style="margin-top:12px"><tr><th>final loss</th>{heads_row}</tr><tr><td>last logged step</td>{losses}</tr></table>
</section>"""


def _heads(r: dict[str, Any]) -> str:
    h = r.get("heads")
    if not h:
        return ""
    rows = []
    if "subtask_accuracy" in h:
        rows.append(("subtask: generated label equals the expert's", "heads.subtask_accuracy",
                     h["subtask_accuracy"], _pct(h["subtask_accuracy"], 1)))
    if "progress_pearson" in h:
        rows.append(("progress: Pearson correlation with frame / length", "heads.progress_pearson",
                     h["progress_pearson"], f"{h['progress_pearson']:.3f}"))
        rows.append(("progress: mean absolute error", "heads.progress_mae", h["progress_mae"],
                     f"{h['progress_mae']:.3f}"))
    if "world_model_latent_mse" in h:
        rows.append(("world model: latent error of the predicted future", "heads.world_model_latent_mse",
                     h["world_model_latent_mse"], f"{h['world_model_latent_mse']:.3f}"))
        rows.append(("… the 'nothing changes' baseline", "heads.copy_baseline_latent_mse",
                     h["copy_baseline_latent_mse"], f"{h['copy_baseline_latent_mse']:.3f}"))
    rows.append(("actions: error of a sampled chunk vs the demonstrated one (normalized)", "heads.action_mse",
                 h["action_mse"], f"{h['action_mse']:.3f}"))
    body = "".join(f'<tr><td>{_e(label)}</td><td class="num">{_v(key, value, text)}</td></tr>'
                   for label, key, value, text in rows)
    d = r["data"]
    return f"""<section id="heads"><h2>Every head on held-out demonstrations</h2>
<p class="sub">{h['samples']} frames from {_n(d['heldout_episodes'], 'demonstration')} collected from training seeds
{d['heldout_first_seed']:,} onward, which no training demonstration used.</p>
<table><tr><th>head</th><th class="num">figure</th></tr>{body}</table></section>"""


def _reproduce(r: dict[str, Any]) -> str:
    qs = r["quickstart"]
    c = qs["commands"]
    steps = "\n".join(_wrap(c[k]) for k in ("collect", "collect_heldout", "train", "eval", "eval_heads") if k in c)
    stage_rows = "".join(f'<tr><td>{_e(name)}</td><td>{_e(s["status"])}</td>'
                         f'<td class="num">{s["seconds"]:.0f} s</td></tr>' for name, s in qs["stages"].items())
    return f"""<section id="reproduce"><h2>Reproduce</h2>
<p class="sub">The whole run (re-running it reuses finished stages and resumes training from its last
checkpoint):</p>
<pre>{_e(_wrap(c['quickstart']))}</pre>
<p class="sub">or stage by stage (the subtask trace is made by the quickstart itself):</p>
<pre>{_e(steps)}</pre>
<table><tr><th>stage</th><th>this run</th><th class="num">time spent</th></tr>{stage_rows}</table>
</section>"""


# ---------------------------------------------------------------------------------------------------- helpers


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'s' * (count != 1)}"


def _wrap(command: str, width: int = 96) -> str:
    """A long command on several lines (shell continuations), broken before a flag."""
    lines, line = [], ""
    for word in command.split(" "):
        if line and word.startswith("--") and len(line) + 1 + len(word) > width:
            lines.append(line + " \\")
            line = "    " + word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def _e(text: Any) -> str:
    return html.escape(str(text))


def _pct(x: float, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f}%"


def _v(key: str, value: Any, text: str | None = None) -> str:
    """A number from results.json, tagged with where it came from."""
    return f'<span data-key="{_e(key)}" data-value="{_e(repr(value))}">{_e(text if text is not None else value)}</span>'


def _card(value: str, label: str, key: str | None = None, raw: Any = None, note: str = "") -> str:
    tag = f' data-key="{_e(key)}" data-value="{_e(repr(raw))}"' if key else ""
    extra = f'<div class="k">{_e(note)}</div>' if note else ""
    return f'<div class="card"><div class="v"{tag}>{_e(value)}</div><div class="k">{_e(label)}</div>{extra}</div>'


def _bar(rate: float, lo: float, hi: float) -> str:
    return (f'<div class="track"><div class="fill" style="width:{100 * rate:.1f}%"></div>'
            f'<div class="ci" style="left:{100 * lo:.1f}%;width:{100 * (hi - lo):.1f}%"></div></div>')


def _seed_of(video: str) -> int | None:
    m = re.search(r"_seed(\d+)\.mp4$", video)
    return int(m.group(1)) if m else None


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _strip_uri(png: Path) -> str:
    """eval-heads' strip (rows of now | real | predicted) reflowed into two columns: half as tall on the page."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.open(png).convert("RGB")
    top, width = 18, img.width  # the strip's label row, then square-frame rows three frames wide
    row = width // 3
    rows = (img.height - top) // row if row else 0
    if rows < 2 or top + rows * row != img.height:
        return _data_uri(png, "image/png")
    half, gap, header = (rows + 1) // 2, 12, 30
    out = Image.new("RGB", (2 * width + gap, header + half * row), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=17)
    for col in range(2):
        x = col * (width + gap)
        for j, text in enumerate(("now", "real future", "predicted future")):
            draw.text((x + j * row + 4, 6), text, fill="#1d2330", font=font)
        for i in range(half):
            k = col * half + i
            if k < rows:
                out.paste(img.crop((0, top + k * row, width, top + (k + 1) * row)), (x, header + i * row))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _poster(video: Path) -> str | None:
    """The video's last frame as a JPEG data URI: the outcome shows before the video plays."""
    try:
        import av
        from PIL import Image

        with av.open(str(video)) as container:
            last = None
            for frame in container.decode(video=0):
                last = frame
            if last is None:
                return None
            buf = io.BytesIO()
            Image.fromarray(last.to_ndarray(format="rgb24")).save(buf, format="JPEG", quality=85)
    except Exception:  # noqa: BLE001 -- a poster is a nicety; the video itself is still embedded
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
