"""A real browser for the tests: Debian's Chromium, launched by Playwright (which downloads no browser of its own)."""
from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# no download, no background traffic of the browser's own: it talks to 127.0.0.1 only
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# every visible control has a name, and every visible text stands out from what is behind it (WCAG 2.1 AA: 4.5:1,
# large text 3:1)
A11Y_PROBLEMS = """() => {
  const problems = [];
  const visible = e => e.offsetParent !== null || e.getClientRects().length > 0;
  for (const e of document.querySelectorAll('input, select, textarea, button, a[href]')) {
    if (!visible(e) || e.type === 'hidden') continue;
    const named = (e.labels && e.labels.length) || e.getAttribute('aria-label') || e.textContent.trim();
    if (!named) problems.push('no name: ' + e.outerHTML.slice(0, 100));
  }
  const rgb = c => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
    .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = e => {
    for (; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] === 1)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  for (const e of document.querySelectorAll('body *')) {
    if (!visible(e) || e.closest('.u-wrap, svg, canvas, .sr-only')) continue;
    if (![...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
    const style = getComputedStyle(e);
    if (style.visibility === 'hidden' || e.closest('button:disabled')) continue;
    const [l1, l2] = [lum(rgb(style.color).slice(0, 3)), lum(background(e))];
    const ratio = (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05);
    const size = parseFloat(style.fontSize), bold = parseInt(style.fontWeight) >= 700;
    const needed = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
    if (ratio < needed) problems.push(`contrast ${ratio.toFixed(2)} < ${needed}: ${e.tagName} "${e.textContent.trim().slice(0, 40)}"`);
  }
  return problems;
}"""


def launch(playwright):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (scripts/bootstrap.sh --test installs Debian's chromium)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def accessibility_problems(page) -> list[str]:
    return page.evaluate(A11Y_PROBLEMS)
