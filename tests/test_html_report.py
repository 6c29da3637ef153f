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
    audit = build_audit(collect(root))  # every setting: D3-not-evaluated runs, a failed and an interrupted run
    assert audit.unevaluated() and audit.not_finished
    parser = _Text()
    parser.feed(html_page(audit, {}, title="Audit", context={"results": str(root)}))
    parser.close()
    return parser


def test_no_raw_markdown_reaches_the_text(page):
    text = "".join(page.text)
    for syntax in ("**", "`", "]("):
        assert syntax not in text, f"{syntax!r} in: {text[max(0, text.find(syntax) - 80):text.find(syntax) + 80]!r}"
    assert "Definitions" in text and "D3 not evaluated" in text and "Skipped" in text


def test_markdown_is_rendered(page):
    text = "".join(page.text)
    assert "strong" in page.tags and "em" in page.tags and "code" in page.tags
    assert "deep cos: mean over blocks" in text  # a definition: its term bold, then the text
    assert "creditaudit sweep cross_arch --with-baselines" in text  # a D3 reason's command, as code
    assert "resume with creditaudit train rule=dfa" in text  # the interrupted run's command
    assert "Definitions" in text and text.index("Definitions") < text.index("D3 not evaluated")  # no longer mixed in
