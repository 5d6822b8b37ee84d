"""`tunebench report`: one self-contained HTML report (and a Markdown summary) for one or more runs."""

from __future__ import annotations

import json
import logging
from html import escape
from pathlib import Path

from tunebench.judge.language import fails_gate, japanese_share
from tunebench.report.collect import RunRecord, config_differences, load_run, wins_and_losses
from tunebench.report.pairwise import pairwise_section, verdict_cell
from tunebench.report.svg import line_chart
from tunebench.runs import REPORT_HTML, REPORT_MD

log = logging.getLogger(__name__)

STYLE = """
body{font-family:system-ui,'Noto Sans CJK JP',sans-serif;margin:2em;max-width:1200px;color:#111}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f4f6}td.answer{white-space:pre-wrap;max-width:420px;font-size:13px}
.ok{color:#15803d}.bad{color:#b91c1c}.num{text-align:right;font-variant-numeric:tabular-nums}
"""


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def score_cell(run: RunRecord) -> str:
    s = run.scores
    if not s or s.get("mean") is None:
        return "not judged" if not s else f"no scores ({s.get('unscored')} unscored)"
    return f"{s['mean']:.3f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"


def validation_text(run: RunRecord) -> str:
    v = run.validation
    if v is None:
        return "not validated"
    return f"valid ({v['tasks']} tasks)" if v["ok"] else f"{len(v['issues'])} problem(s): " + "; ".join(v["issues"][:3])


def summary_rows(runs: list[RunRecord]) -> list[list[str]]:
    rows = []
    for run in runs:
        final_loss = run.losses[-1][1] if run.losses else None
        s = run.scores or {}
        rows.append([run.name, str(run.setting("model.name_or_path")), str(run.setting("train.method")),
                     fmt(final_loss), score_cell(run), f"{s.get('scored', '–')}/{s.get('unscored', '–')}",
                     fmt((run.nll or {}).get("nll")), fmt(run.answer_lengths().get("mean"), 0), validation_text(run)])
    return rows


SUMMARY_HEAD = ["run", "model", "method", "final loss", "judge mean [95% CI]", "scored/unscored",
                "reference NLL", "mean answer chars", "submission"]


def html_table(head: list[str], rows: list[list[str]], table_id: str, raw_cols: set[int] = frozenset()) -> str:
    out = [f'<table id="{table_id}"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        cells = "".join(f"<td>{c if i in raw_cols else escape(c)}</td>" for i, c in enumerate(row))
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(runs: list[RunRecord], pairwise: dict | None = None) -> str:
    title = "tunebench report: " + " vs ".join(r.name for r in runs)
    parts = [f"<!doctype html><html lang='ja'><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"]
    parts.append(defects_html(runs))
    if pairwise:  # `tunebench compare`'s result leads: it is the sensitive comparison of two runs
        parts.append(pairwise_section(pairwise))
    parts.append("<h2>Scores</h2>" + html_table(SUMMARY_HEAD, summary_rows(runs), "score-table"))
    parts.append("<h2>Training loss</h2>")
    parts.append(line_chart({r.name: [(s, v) for s, v in r.losses] for r in runs}, "training loss (answer tokens)",
                            "step", "loss"))
    if any(r.eval_losses for r in runs):
        parts.append(line_chart({r.name: r.eval_losses for r in runs}, "eval loss", "step", "loss"))
    preference = [r for r in runs if r.series("reward_margin")]
    if preference:  # DPO/ORPO/SimPO runs: how far chosen is preferred over rejected
        parts.append("<h2>Preference rewards</h2>")
        parts.append(line_chart({r.name: r.series("reward_margin") for r in preference},
                                "reward margin (chosen − rejected)", "step", "margin"))
        parts.append(line_chart({r.name: r.series("reward_accuracy") for r in preference},
                                "reward accuracy (share of pairs with chosen ahead)", "step", "accuracy"))
    diffs = config_differences(runs)
    heading = "Config" if len(runs) == 1 else "Config differences"
    parts.append(f"<h2>{heading}</h2>" + (html_table(["setting"] + [r.name for r in runs],
                                                      [[k] + [json.dumps(v, ensure_ascii=False) for v in vals]
                                                       for k, vals in diffs.items()], "config-table")
                                          if diffs else "<p>identical configs</p>"))
    parts.append("<h2>Training data</h2>")
    parts.append(html_table(["run", "records read", "kept", "truncated", "dropped (why)", "train tokens",
                             "tokens with loss"],
                            [[r.name, fmt(r.data_summary.get("read")), fmt(r.data_summary.get("kept")),
                              fmt(r.data_summary.get("truncated")),
                              ", ".join(f"{n} {k}" for k, n in sorted(r.data_summary.get("dropped", {}).items())) or "none",
                              fmt(r.data_summary.get("train_tokens")), fmt(r.data_summary.get("answer_tokens"))]
                             for r in runs], "data-table"))
    parts.append("<h2>Answer lengths (characters)</h2>")
    stats = ["n", "mean", "median", "min", "max", "empty"]
    parts.append(html_table(["run"] + stats, [[r.name] + [fmt(r.answer_lengths().get(k), 1) for k in stats]
                                              for r in runs], "length-table"))
    if len(runs) >= 2:
        wins, losses = wins_and_losses(runs[0], runs[1])
        for label, rows in (("wins", wins), ("losses", losses)):
            parts.append(f"<h2>Biggest per-task {label}: {escape(runs[1].name)} vs {escape(runs[0].name)}</h2>")
            parts.append(html_table(["task", runs[0].name, runs[1].name, "Δ"],
                                    [[str(t), fmt(a, 2), fmt(b, 2), f"{d:+.2f}"] for t, a, b, d in rows],
                                    f"{label}-table") if rows else "<p>none</p>")
    parts.append("<h2>Per task</h2>" + per_task_table(runs, pairwise))
    parts.append("</body></html>")
    return "".join(parts)


LANGUAGE_THRESHOLD = 0.5  # answers with fewer Japanese letters than this are marked (judge/language.py)


def per_task_table(runs: list[RunRecord], pairwise: dict | None = None) -> str:
    task_ids = list(dict.fromkeys(t for r in runs for t in r.predictions))
    head = ["task", "input"] + [f"{r.name} (score)" for r in runs]
    verdicts = {row["task_id"]: row for row in (pairwise or {}).get("per_task", [])}
    if pairwise:
        head.append("pairwise verdict")
    rows = []
    for task_id in task_ids:
        first = next(r.predictions[task_id] for r in runs if task_id in r.predictions)
        cells = [escape(str(task_id)), f'<div class="answer">{escape(str(first.get("input"))[:300])}</div>']
        for run in runs:
            pred = run.predictions.get(task_id)
            score = run.task_scores.get(task_id)
            text = answer_html(pred)
            if pred and isinstance(pred.get("output"), str) and fails_gate(pred["output"], LANGUAGE_THRESHOLD):
                text = f'<span class="bad">[{japanese_share(pred["output"]):.0%} Japanese]</span> ' + text
            cells.append(f'<div class="answer"><b>{fmt(score, 2)}</b>\n{text}</div>')
        if pairwise:
            cells.append(verdict_cell(verdicts[task_id], pairwise["a"]["name"], pairwise["b"]["name"])
                         if task_id in verdicts else "<em>not compared</em>")
        rows.append(cells)
    return html_table(head, rows, "task-table", raw_cols=set(range(len(head))))


def answer_html(pred: dict | None) -> str:
    if pred is None:
        return "<em>missing</em>"
    output = pred.get("output")
    return escape(output) if isinstance(output, str) else f"<em>not a string: {escape(repr(output)[:200])}</em>"


def defects_html(runs: list[RunRecord]) -> str:
    defects = [d for r in runs for d in r.defects]
    if not defects:
        return ""
    return ("<h2 class='bad'>Problems in the run files</h2><ul>" + "".join(f"<li>{escape(d)}</li>" for d in defects)
            + "</ul>")


def render_markdown(runs: list[RunRecord], pairwise: dict | None = None) -> str:
    lines = ["# tunebench report: " + " vs ".join(r.name for r in runs), ""]
    if pairwise:
        from tunebench.judge.compare import format_summary

        lines += [format_summary(s, pairwise["a"]["name"], pairwise["b"]["name"]).replace("\n", "  \n")
                  for s in pairwise["judges"] + ([pairwise["panel"]] if pairwise["panel"] else [])] + [""]
    lines += ["| " + " | ".join(SUMMARY_HEAD) + " |", "|" + "---|" * len(SUMMARY_HEAD)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in summary_rows(runs)]
    lines += [""] + [f"- problem: {d}" for r in runs for d in r.defects]
    if len(runs) >= 2:
        wins, losses = wins_and_losses(runs[0], runs[1])
        lines += ["", f"Biggest wins of {runs[1].name}: " + (", ".join(f"task {t} ({d:+.1f})" for t, _, _, d in wins) or "none"),
                  f"Biggest losses of {runs[1].name}: " + (", ".join(f"task {t} ({d:+.1f})" for t, _, _, d in losses) or "none")]
    return "\n".join(lines) + "\n"


def write_report(roots: list[Path], out_dir: Path, pairwise: dict | None = None) -> tuple[Path, Path]:
    """Write report.html and report.md; problems in the run files are listed in both and logged."""
    runs = [load_run(Path(root)) for root in roots]
    for defect in (d for r in runs for d in r.defects):
        log.warning("%s", defect)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out_dir / REPORT_HTML, out_dir / REPORT_MD
    html_path.write_text(render_html(runs, pairwise), encoding="utf-8")
    md_path.write_text(render_markdown(runs, pairwise), encoding="utf-8")
    return html_path, md_path
