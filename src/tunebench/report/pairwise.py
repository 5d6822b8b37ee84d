"""The pairwise section of a two-run report: the headline result and per-task verdicts (compare.json)."""

from __future__ import annotations

from html import escape


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def summary_row(summary: dict) -> list[str]:
    lc = summary["length_control"]
    ci = "–" if summary["win_rate"] is None else f"{summary['win_rate']:.3f} [{summary['ci_low']:.2f}, {summary['ci_high']:.2f}]"
    return [summary["judge"], f"{summary['wins']} / {summary['ties']} / {summary['losses']}", ci,
            "–" if lc.get("lc_win_rate") is None else f"{lc['lc_win_rate']:.3f}",
            pct(summary.get("position_consistency")), f"{summary['scored']} / {summary['unscored']}"]


def pairwise_section(result: dict) -> str:
    """Headline, per-judge table, panel agreement, length and language notes, as HTML."""
    a, b = escape(result["a"]["name"]), escape(result["b"]["name"])
    head = result["headline"]
    parts = [f'<section id="pairwise"><h2>Pairwise: {b} (B) vs {a} (A)</h2>']
    if head["scored"]:
        parts.append(f'<p class="headline"><b>{b}</b> wins {head["wins"]}, ties {head["ties"]}, loses {head["losses"]} '
                     f'of {head["scored"]} judged tasks: win rate <b>{head["win_rate"]:.3f}</b> '
                     f'(95% CI {head["ci_low"]:.2f}–{head["ci_high"]:.2f}); a win counts only when both orders agree.</p>')
    else:
        parts.append(f'<p class="headline">No task could be judged ({head["unscored"]} unscored).</p>')
    lc = head["length_control"]
    if lc.get("winner_simply_longer"):
        parts.append(f'<p class="bad">The winner is simply longer: at equal length the win rate is '
                     f'{lc["lc_win_rate"]:.3f}; the longer answer won {pct(lc["longer_won_share"])} of decisive verdicts.</p>')
    la, lb = result["lengths"]["a"], result["lengths"]["b"]
    parts.append(f'<p>Answer length (characters): {a} mean {la.get("mean", 0):.0f} / median {la.get("median", 0):.0f}; '
                 f'{b} mean {lb.get("mean", 0):.0f} / median {lb.get("median", 0):.0f}.</p>')
    flagged = result["language_flagged"]
    if flagged["a"] or flagged["b"]:
        parts.append(f'<p class="bad">Under {result["language_threshold"]:.0%} Japanese letters: {a} '
                     f'{len(flagged["a"])} answer(s), {b} {len(flagged["b"])} answer(s).</p>')
    rows = [summary_row(s) for s in result["judges"]] + ([summary_row(result["panel"])] if result["panel"] else [])
    table = ["<table id='pairwise-table'><thead><tr>" + "".join(
        f"<th>{h}</th>" for h in ("judge", "B wins / ties / losses", "win rate [95% CI]", "length-controlled",
                                  "position consistency", "scored / unscored")) + "</tr></thead><tbody>"]
    table += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("".join(table) + "</tbody></table>")
    if result["panel"]:
        parts.append("<p>Judge agreement: " + "; ".join(
            f"{escape(p['judges'][0])} / {escape(p['judges'][1])} {pct(p['agreement'])} of {p['n']}"
            for p in result["panel"]["agreement"]) + "</p>")
    parts.append("</section>")
    return "".join(parts)


def verdict_cell(row: dict, name_a: str, name_b: str) -> str:
    """One task's verdict, then each judge's verdict and reasons in both orders, for the per-task table."""
    labels = {"A": f"{name_a} wins", "B": f"{name_b} wins", "tie": "tie", None: "unscored"}
    said = {"A": name_a, "B": name_b, "tie": "tie", None: "unscored"}
    css = {"A": "bad", "B": "ok"}.get(row["winner"], "")
    lines = [f'<div class="answer"><b class="{css}">{escape(labels[row["winner"]])}</b>']
    for judge, verdict in row["verdicts"].items():
        if len(row["verdicts"]) > 1 or verdict["gated"]:
            gate = " (language gate)" if verdict["gated"] else ""
            lines.append(f"<br><i>{escape(judge)}: {escape(labels[verdict['winner']])}{gate}</i>")
        for order in ("AB", "BA") if not verdict["gated"] else ():
            why = verdict["reasons"].get(order) or verdict["errors"].get(order) or ""
            if order in verdict.get("unparsed", {}):
                why += f" (reply: {verdict['unparsed'][order][:120]})"
            shown_first = name_a if order == "AB" else name_b
            lines.append(f"<br>[{escape(shown_first)} first] → {escape(said[verdict['orders'].get(order)])}: "
                         f"{escape(why[:320])}")
    return "".join(lines) + "</div>"
