"""The HTML audit page renders its own Markdown: the reader sees bold, italics and code, never the
``**``, backticks or link syntax of the Markdown it was written in."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from creditaudit.reports.audit import build_audit, html_page
from creditaudit.reports.collect import collect
from tests.results_factory import study


class _Text(HTMLParser):
    """The page's text as a reader sees it (not inside <style> or <script>), and its tags."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._hidden += tag in ("style", "script")

    def handle_endtag(self, tag):
        self._hidden -= tag in ("style", "script")

    def handle_data(self, data):
        if not self._hidden:
            self.text.append(data)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = study(tmp_path_factory.mktemp("study") / "results")
    audit = build_audit(
        collect(root)
    )  # every setting: D3-not-evaluated runs, a failed and an interrupted run
    assert audit.unevaluated() and audit.not_finished
    parser = _Text()
    parser.feed(html_page(audit, {}, title="Audit", context={"results": str(root)}))
    parser.close()
    return parser


def test_no_raw_markdown_reaches_the_text(page):
    text = "".join(page.text)
    for syntax in ("**", "`", "]("):
        assert syntax not in text, (
            f"{syntax!r} in: {text[max(0, text.find(syntax) - 80) : text.find(syntax) + 80]!r}"
        )
    assert "Definitions" in text and "D3 not evaluated" in text and "Skipped" in text


def test_markdown_is_rendered(page):
    text = "".join(page.text)
    assert "strong" in page.tags and "em" in page.tags and "code" in page.tags
    assert "deep cos: mean over blocks" in text  # a definition: its term bold, then the text
    assert "creditaudit sweep cross_arch --with-baselines" in text  # a D3 reason's command, as code
    assert "resume with creditaudit train rule=dfa" in text  # the interrupted run's command
    assert "Definitions" in text and text.index("Definitions") < text.index(
        "D3 not evaluated"
    )  # no longer mixed in


@pytest.fixture(scope="module")
def main_audit(tmp_path_factory):
    from tests.results_factory import SEEDS, make_run

    root = study(tmp_path_factory.mktemp("study") / "results")
    for seed in SEEDS:
        make_run(root, "frozen_baselines", "bp_frozen", seed)
    audit = build_audit(collect(root), setting="main_audit")
    return audit, html_page(audit, {}, title="Audit")


def test_the_page_has_everything_the_markdown_report_has(main_audit):
    from creditaudit.reports.audit import FIRE_NOTE, markdown, per_run_rows

    audit, page = main_audit
    parser = _Text()
    parser.feed(page)
    text = " ".join("".join(parser.text).split())
    th = audit.thresholds
    assert (
        f"D3 when depth utility < {th.d3_pp:g} pp" in text
        and f"|deep cos| < {th.mode2_cos:g}" in text
    )
    assert (
        FIRE_NOTE in text
        and "Frozen-blocks baseline bp_frozen: test acc" in text
        and "Per run" in text
    )
    for row in per_run_rows(audit):
        assert row[0] in text and row[6] in text
    assert "needs walk-back: a detector fired or Mode 2 shows" in text
    md = markdown(audit, plots={"norms": "audit_norms.png"})
    assert "### Norms against the D1 and D2 thresholds" in md


def test_no_figure_cell_wraps(main_audit):
    """Every cell that holds a figure is marked not to wrap; a shared n is said once, not per cell."""
    import re

    _, page = main_audit
    cells = re.findall(r"<td( class='[^']*')?>([^<]*)</td>", page)
    figures = [(cls, c) for cls, c in cells if re.match(r"^[+\-]?(\d|\.\d)", c)]
    assert figures and all("num" in cls for cls, _ in figures)
    assert "(n=3)" not in "".join(c for _, c in figures) and "over n=3 seeds" in page
    assert "td.num{white-space:nowrap" in page
