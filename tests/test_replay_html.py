"""The HTML forensic report, opened in headless Chromium: it draws its timeline and plots from the
embedded report, offline, and shows attacker-chosen strings as text."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from monitor.replay.html import render
from tests.report_fixture import (HOSTILE, HOSTILE_SUMMARY, empty_report, forensic_report, huge_report,
                                  sparse_report)

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


class Opened:
    """A report open in a page, with what the page said and asked for while it loaded."""

    def __init__(self, page: Any, url: str) -> None:
        self.page, self.url = page, url
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.errors.append(f"page: {e}"))
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.goto(url, wait_until="load")

    def attrs(self, selector: str, name: str) -> dict[str, str | None]:
        return self.page.eval_on_selector_all(
            selector, f"els => Object.fromEntries(els.map(e => [e.dataset.plot, e.getAttribute({name!r})]))")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 1000})
        yield context
        context.close()


@pytest.fixture
def open_report(browser: Any, tmp_path: Path) -> Iterator[Any]:
    pages = []

    def open_(report: dict[str, Any]) -> Opened:
        path = tmp_path / "report.html"
        path.write_text(render(report), encoding="utf-8")
        pages.append(browser.new_page())
        return Opened(pages[-1], path.as_uri())

    yield open_
    for page in pages:
        page.close()


def points(values: list[Any]) -> int:
    return sum(v is not None for v in values)


def expected_points(series: dict[str, Any]) -> dict[str, int]:
    """data-plot -> the points a plot of that series has to draw: its values that are not null."""
    out = {}
    for model, s in series.items():
        if "drift" in s:
            out[f"{model}:drift"] = points(s["drift"]["values"])
        if "low_confidence_rate" in s:
            out[f"{model}:low_confidence_rate"] = points(s["low_confidence_rate"]["values"])
        if "latency_ms" in s:
            out[f"{model}:latency_ms"] = points(s["latency_ms"]["p50"]) + points(s["latency_ms"]["p95"])
        if "client_risk" in s:
            out[f"{model}:client_risk"] = sum(points(v) for v in s["client_risk"]["clients"].values())
    return out


def test_same_report_same_bytes_with_the_data_inline_and_nothing_to_fetch() -> None:
    report = forensic_report()
    html = render(report)
    assert render(forensic_report()) == html
    assert re.findall(r"""<\w+[^<>]*\b(?:src|href)=["']?([^"' >]*)""", html) == ["data:,"]  # the empty favicon
    data = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1)
    assert "</" not in data and "<script" not in data
    assert json.loads(data) == report


def test_loads_offline_without_errors(open_report: Any) -> None:
    opened = open_report(forensic_report())
    assert opened.errors == []
    assert opened.requests == [opened.url]


def test_header_gives_chain_of_custody_in_utc(open_report: Any) -> None:
    report = forensic_report()
    header = open_report(report).page.inner_text("header")
    assert report["config"]["sha256"] in header and report["inputs"][1]["sha256"] in header
    assert "2025-11-27T08:00:00.000Z to 2025-11-27T08:09:59.950Z" in header
    assert "invalid_json: 50, missing_field: 229" in header


def test_every_plot_is_drawn_with_its_points_thresholds_and_legend(open_report: Any) -> None:
    report = forensic_report()
    opened = open_report(report)
    drawn = opened.attrs("[data-plot]", "data-drawn")
    assert drawn == {key: str(n) for key, n in expected_points(report["series"]).items()}
    assert all(int(n) > 0 for n in drawn.values())
    dashed = opened.page.eval_on_selector_all(
        "[data-plot]", "els => els.map(e => e.querySelectorAll('line[stroke-dasharray]').length)")
    assert dashed == [1, 2, 1, 2, 1, 2]  # drift, low-confidence (threshold, alarm), risk, latency (baseline, threshold)
    legend = opened.page.inner_text('[data-plot="digits:client_risk"] .legend')
    assert HOSTILE in legend and "mallory" in legend and "threshold 1" in legend


def test_timeline_marks_each_detection_with_kind_client_and_summary(open_report: Any) -> None:
    report = forensic_report()
    opened = open_report(report)
    assert opened.page.get_attribute("[data-timeline]", "data-drawn") == str(len(report["detections"]))
    titles = opened.page.eval_on_selector_all("[data-timeline] rect.mark", "els => els.map(e => e.textContent)")
    assert len(titles) == len(report["detections"])
    for d in report["detections"]:
        assert any(d["kind"] in t and d["summary"] in t and str(d["client_id"] or "—") in t for t in titles)
    colours = opened.page.eval_on_selector_all("[data-timeline] rect.mark", "els => els.map(e => e.getAttribute('fill'))")
    assert colours.count("#d62728") == sum(d["severity"] == "critical" for d in report["detections"])


def test_hostile_summary_and_client_id_show_as_text_and_run_nothing(open_report: Any) -> None:
    opened = open_report(forensic_report())
    assert opened.dialogs == [] and opened.errors == []
    assert opened.requests == [opened.url]  # an injected <img src=x> would have asked for file:///.../x
    assert opened.page.eval_on_selector_all("script", "els => els.length") == 2
    assert opened.page.eval_on_selector_all("img, [onerror]", "els => els.length") == 0
    clients = opened.page.inner_text("#clients")
    assert f"client {HOSTILE} on digits" in clients and HOSTILE_SUMMARY in clients
    assert HOSTILE_SUMMARY in opened.page.inner_text("#incidents")


def test_step_states_say_what_would_have_run(open_report: Any) -> None:
    steps = open_report(forensic_report()).page.inner_text("#incidents table.steps")
    assert "dry_run would have run" in steps and "skipped not run" in steps
    assert '"routing_key": "***"' in steps


def test_empty_report_says_so_and_draws_nothing(open_report: Any) -> None:
    opened = open_report(empty_report())
    assert opened.errors == [] and opened.requests == [opened.url]
    assert opened.page.inner_text("[data-timeline]") == "No detections."
    assert opened.page.eval_on_selector_all("[data-plot]", "els => els.length") == 0
    assert "No incidents." in opened.page.inner_text("#incidents")
    assert "No suspicious clients." in opened.page.inner_text("#clients")


def test_one_point_is_drawn_and_an_all_null_series_says_it_has_no_values(open_report: Any) -> None:
    opened = open_report(sparse_report())
    assert opened.errors == []
    assert opened.attrs("[data-plot]", "data-drawn") == {
        "ranker:drift": "1", "ranker:low_confidence_rate": "0", "ranker:latency_ms": "0"}
    assert opened.page.eval_on_selector_all('[data-plot="ranker:drift"] circle', "els => els.length") == 1
    assert "No values" in opened.page.inner_text('[data-plot="ranker:latency_ms"]')
    assert "client risk" in opened.page.inner_text("#plots")  # named as not recorded


def test_thousands_of_detections_share_at_most_5000_marks_and_the_page_says_so(open_report: Any) -> None:
    report = huge_report(12_000)
    opened = open_report(report)
    assert opened.errors == []
    marks = opened.page.eval_on_selector_all("[data-timeline] rect.mark", "els => els.length")
    assert 0 < marks <= 5000
    assert opened.page.get_attribute("[data-timeline]", "data-marks") == str(marks)
    assert opened.page.get_attribute("[data-timeline]", "data-drawn") == "12000"
    assert f"12000 detections are shown as {marks} marks" in opened.page.inner_text("[data-timeline] .notice")
