// A model's engine log, following live (server-sent events), at most MAX_LINES kept on the page.
"use strict";
(function () {
  const select = document.getElementById("log-pod");
  const out = document.getElementById("log");
  if (!select || !out) return;
  const status = document.getElementById("log-status");
  const pause = document.getElementById("log-pause");
  const MAX_LINES = 2000;
  let source = null, hidden = 0, paused = false, held = [];

  function show(lines) {
    const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 8;
    out.append(document.createTextNode(lines.map(l => l + "\n").join("")));
    while (out.childNodes.length > 1 && out.textContent.split("\n").length > MAX_LINES) out.firstChild.remove();
    if (atBottom) out.scrollTop = out.scrollHeight;
  }

  function follow() {
    if (source) source.close();
    out.textContent = "";
    hidden = 0;
    held = [];
    const pod = select.value;
    source = new EventSource(`/events/logs/${encodeURIComponent(select.dataset.namespace)}/${encodeURIComponent(pod)}`);
    status.textContent = `Following ${pod}…`;
    source.addEventListener("lines", event => {
      const batch = JSON.parse(event.data);
      hidden += batch.hidden;
      if (paused) held.push(...batch.lines); else show(batch.lines);
      status.textContent = `Following ${pod}` + (hidden ? ` · ${hidden} request lines not shown` : "");
    });
    // a reconnected stream starts with the log's tail again: what was shown goes, so no line shows twice
    let broken = false;
    source.onerror = () => { broken = true; status.textContent = `Reconnecting to ${pod}'s log…`; };
    source.onopen = () => { if (broken) { out.textContent = ""; hidden = 0; held = []; broken = false; } };
  }

  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused && held.length) { show(held); held = []; }
  });
  select.addEventListener("change", follow);
  // replicas come and go: the choice follows the live replicas table
  document.getElementById("model").addEventListener("live:updated", () => {
    const names = [...document.querySelectorAll("#model table tbody th code")].map(c => c.textContent);
    const current = [...select.options].map(o => o.value);
    if (names.join() === current.join()) return;
    const chosen = select.value;
    select.replaceChildren(...names.map(n => new Option(n, n, false, n === chosen)));
    if (!names.includes(chosen) && names.length) follow();
  });
  follow();
})();
